"""The optional all-MiniLM-L6-v2 prompt encoder: verified files, and token states that pool to what
sentence-transformers computes for the same model."""

import shutil

import pytest
import torch

from flexisearch.errors import UserError
from flexisearch.models.text_encoder import (
    MINILM,
    MINILM_SHA256,
    check_files,
    encode,
    minilm_path,
)

CAPTIONS = ["a handwritten seven", "a thin zero leaning left", "two"]


def test_token_states_mean_pool_to_the_sentence_transformers_embedding():
    from sentence_transformers import SentenceTransformer

    embeds, mask = encode(CAPTIONS, max_length=32)
    assert embeds.shape == (3, 32, 384) and mask.shape == (3, 32)
    assert (embeds[mask == 0] == 0).all() and mask[:, 0].eq(1).all()
    pooled = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    ours = torch.nn.functional.normalize(pooled, dim=-1)
    theirs = SentenceTransformer(str(minilm_path()), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_a_changed_encoder_file_is_refused(tmp_path):
    copy = tmp_path / "minilm"
    shutil.copytree(minilm_path(), copy)
    check_files(copy, MINILM_SHA256, MINILM)  # the verified files pass
    with open(copy / "vocab.txt", "a") as f:
        f.write("extra\n")
    with pytest.raises(UserError, match="vocab.txt: not the all-MiniLM-L6-v2 file this project verified"):
        check_files(copy, MINILM_SHA256, MINILM)
