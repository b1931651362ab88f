"""umT5: loader errors (on the tiny parity checkpoint), tokenizers, TextEncoder, real-size layout."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from infinitetalk.errors import CheckpointError, MissingWeightsError
from infinitetalk.models.text import TextEncoder, UMT5Config, UMT5Encoder
from infinitetalk.models.tokenizer import ByteTokenizer, clean_prompt
from infinitetalk.weights.t5_loader import (
    UMT5Tokenizer,
    load_text_encoder,
    load_tokenizer,
    load_umt5_encoder,
)


@pytest.fixture()
def tiny(parity_dir: Path) -> tuple[Path, UMT5Config]:
    t5_dir = parity_dir / "t5"
    cfg = UMT5Config.from_dict(json.loads((t5_dir / "config.json").read_text()))
    return next(iter(sorted(t5_dir.glob("*.pth")))), cfg


# ---------------------------------------------------------------- errors


def test_missing_file_names_it(tmp_path: Path, tiny):
    _, cfg = tiny
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    with pytest.raises(MissingWeightsError) as err:
        load_umt5_encoder(path, cfg)
    assert str(path) in str(err.value) and err.value.missing == [str(path)]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_names_it(tmp_path: Path, tiny, damage: str):
    src, cfg = tiny
    path = tmp_path / "models_t5_damaged.pth"
    data = src.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as err:
        load_umt5_encoder(path, cfg)
    assert str(path) in str(err.value)


def test_missing_key_names_key_and_file(tmp_path: Path, tiny):
    src, cfg = tiny
    state = torch.load(src, weights_only=True)
    del state["blocks.1.ffn.fc2.weight"]
    path = tmp_path / "models_t5_incomplete.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_umt5_encoder(path, cfg, dtype=torch.float32)
    assert "blocks.1.ffn.fc2.weight" in str(err.value) and str(path) in str(err.value)


def test_unexpected_key_is_refused(tmp_path: Path, tiny):
    src, cfg = tiny
    state = torch.load(src, weights_only=True)
    state["decoder.blocks.0.norm1.weight"] = torch.ones(cfg.dim)
    path = tmp_path / "models_t5_extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="decoder.blocks.0.norm1.weight"):
        load_umt5_encoder(path, cfg, dtype=torch.float32)


def test_wrong_config_names_key(tiny):
    src, cfg = tiny
    with pytest.raises(CheckpointError, match="shape"):
        load_umt5_encoder(src, UMT5Config.from_dict({**cfg.to_dict(), "dim_ffn": cfg.dim_ffn * 2}))


def test_safetensors_copy_loads_the_same(tmp_path: Path, tiny):
    from safetensors.torch import save_file

    src, cfg = tiny
    path = tmp_path / "t5.safetensors"
    save_file(torch.load(src, weights_only=True), str(path))
    a = load_umt5_encoder(src, cfg, dtype=torch.float32)
    b = load_umt5_encoder(path, cfg, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tokenizer_folder_missing(tmp_path: Path):
    with pytest.raises(MissingWeightsError, match="tokenizer"):
        UMT5Tokenizer(tmp_path / "google" / "umt5-xxl")


def test_real_config_refuses_byte_tokenizer():
    with pytest.raises(MissingWeightsError, match="umt5-xxl"):
        load_tokenizer(None, UMT5Config())


# ---------------------------------------------------------------- text encoder


def test_text_encoder_trims_to_token_counts_and_ignores_pad_length(tiny):
    src, cfg = tiny
    t0 = time.process_time()
    enc = load_text_encoder(src, None, cfg, dtype=torch.float32)
    prompts = ["a woman talks", "ein Mann singt \u00fcber Musik, laut"]
    out = enc.encode(prompts)
    assert [tuple(u.shape) for u in out] == [(len(clean_prompt(p).encode()) + 1, cfg.dim) for p in prompts]
    short = TextEncoder(ByteTokenizer(text_len=48, vocab_size=cfg.vocab_size), enc.model).encode(prompts)
    for a, b in zip(out, short):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # batching does not change a prompt's encoding
    torch.testing.assert_close(enc.encode(prompts[1])[0], out[1], rtol=1e-5, atol=1e-5)
    print(f"[time] t5 text encoder (tiny): {time.process_time() - t0:.2f}s cpu")


def test_bfloat16_load(tiny):
    src, cfg = tiny
    model = load_umt5_encoder(src, cfg)  # default dtype: bfloat16, as the official pipeline
    assert model.token_embedding.weight.dtype == torch.bfloat16
    ids, mask = ByteTokenizer(16, cfg.vocab_size)(["hello world"])
    with torch.no_grad():
        got = model(ids, mask).float()
        ref = load_umt5_encoder(src, cfg, dtype=torch.float32)(ids, mask)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_byte_tokenizer_contract():
    ids, mask = ByteTokenizer(text_len=8, vocab_size=259)(["ab", "abcdefghijk"])
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    assert ids[0].tolist() == [ord("a") + 3, ord("b") + 3, 1, 0, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1, -1] == 1 and mask[1].sum() == 8  # truncated to text_len - 1, then </s>


def test_clean_prompt():
    assert clean_prompt("  A\u3000man\uff0c  \u201ctalking\u201d\n\tfast &amp;amp; loud ") == 'A man, "talking" fast & loud'
    assert clean_prompt("it\u2019s \ufb01ne") == "it's fine"


def test_hf_tokenizer_folder(tmp_path: Path):
    """UMT5Tokenizer on a small Hugging Face format folder: pads to text_len, appends </s>, truncates."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "man": 4, "talks": 5, ",": 6, "loud": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path / "google" / "umt5-xxl"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)

    tokenizer = UMT5Tokenizer(folder, text_len=8)
    ids, mask = tokenizer(["a  man\uff0ctalks", "a man talks loud loud loud loud loud loud"])
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    assert ids[0].tolist() == [3, 4, 6, 5, 1, 0, 0, 0]  # fullwidth comma cleaned to ','
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ids[1, -1] == 1 and int(mask[1].sum()) == 8

    (folder / "tokenizer.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match=str(folder)):
        UMT5Tokenizer(folder)


# ---------------------------------------------------------------- real size


def test_real_config_on_meta_is_umt5_xxl():
    cfg = UMT5Config()
    assert (cfg.vocab_size, cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_layers, cfg.num_buckets, cfg.shared_pos) == (
        256384, 4096, 4096, 10240, 64, 24, 32, False)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 5.6e9 < n < 5.8e9
    keys = set(model.state_dict())
    assert "blocks.23.pos_embedding.embedding.weight" in keys and "blocks.0.ffn.gate.0.weight" in keys
    assert "pos_embedding.embedding.weight" not in keys and len(keys) == 1 + 24 * 10 + 1
