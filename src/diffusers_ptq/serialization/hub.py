"""`push_to_hub`: save a diffusers-ptq pipeline or UNet and upload it, with a model card, via huggingface_hub.

The token is handed to huggingface_hub and nowhere else: it is never printed, logged or written to disk here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from huggingface_hub import CommitInfo, HfApi

from diffusers_ptq.serialization.model_card import build_model_card, quantized_unet

logger = logging.getLogger("diffusers_ptq")


def push_to_hub(
    pipe_or_unet: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Save `pipe_or_unet` (quantized by diffusers-ptq) and upload it to the Hub repo `repo_id`.

    Creates the repo if needed (`private` applies only then), writes the checkpoint with `save_pretrained`
    into a temporary folder, adds a model card (README.md) and uploads everything in one commit, or as a
    pull request with `create_pr=True`. Returns huggingface_hub's `CommitInfo`. Load it elsewhere with
    `import diffusers_ptq` followed by the ordinary `from_pretrained(repo_id)`.
    """
    quantized_unet(pipe_or_unet)  # fail before creating anything remotely
    with tempfile.TemporaryDirectory(prefix="diffusers_ptq_push_") as tmp:
        folder = os.path.join(tmp, "checkpoint")
        pipe_or_unet.save_pretrained(folder)
        return upload_saved_folder(
            pipe_or_unet,
            folder,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            create_pr=create_pr,
        )


def upload_saved_folder(
    pipe_or_unet: Any,
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Write the model card into `folder` (a saved checkpoint of `pipe_or_unet`) and upload the folder."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    card = build_model_card(pipe_or_unet, repo_id)
    card.save(os.path.join(folder, "README.md"))
    unet = quantized_unet(pipe_or_unet)
    tag = unet.ptq_state.config.tag
    message = commit_message or f"Upload {tag} {type(pipe_or_unet).__name__} quantized with diffusers-ptq"
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=message, token=token, create_pr=bool(create_pr)
    )
    logger.info("diffusers-ptq: pushed %s to %s (%s)", type(pipe_or_unet).__name__, repo_id, info.commit_url)
    return info
