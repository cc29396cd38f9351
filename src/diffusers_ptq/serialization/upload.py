"""Upload a saved diffusers-ptq checkpoint folder to the Hub with a model card.

Shared by `hub.push_to_hub` (which saves, then uploads) and the `save_pretrained(push_to_hub=True)` wrapper
of `saving.py`; it imports neither of them. The token is handed to huggingface_hub and nowhere else.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from huggingface_hub import CommitInfo, HfApi

from diffusers_ptq.serialization.model_card import build_model_card, quantized_unet

logger = logging.getLogger("diffusers_ptq")


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
