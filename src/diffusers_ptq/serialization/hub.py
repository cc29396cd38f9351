"""`push_to_hub`: save a diffusers-ptq pipeline or UNet and upload it, with a model card, via huggingface_hub.

The token is handed to huggingface_hub and nowhere else: it is never printed, logged or written to disk here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from huggingface_hub import CommitInfo

from diffusers_ptq.serialization.model_card import quantized_unet
from diffusers_ptq.serialization.upload import upload_saved_folder


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
