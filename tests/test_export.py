"""`minillm export`: a native transformers checkpoint that loads without minillm, and the way back."""

import json

import pytest
import torch
from cli_helpers import run_cli
from model_checks import check_hf_export, write_tiny_tokenizer

from minillm.models.registry import build_model

VOCAB = 256


def tiny_llama():
    torch.manual_seed(0)
    return build_model(
        "mini_llama3", "tiny", vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=False
    )


def test_export_llama_loads_without_minillm(tmp_path):
    dst = check_hf_export(tiny_llama(), tmp_path, "LlamaForCausalLM")
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llama"
    # A pad id would become LlamaModel's padding_idx and freeze the eos (= pad) embedding row in fine-tuning.
    assert config.get("pad_token_id") is None
    generation = json.loads((dst / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 0)


def test_export_cli(tmp_path, capsys):
    src = tmp_path / "run" / "final"
    tiny_llama().save_pretrained(src)
    write_tiny_tokenizer(src, VOCAB)
    capsys.readouterr()  # the save above, outside the CLI, may show transformers' bar
    # A run directory resolves to its final/.
    assert run_cli("export", "--to", "hf", str(src.parent), str(tmp_path / "hf")) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert run_cli("export", "--to", "minillm", str(tmp_path / "hf"), str(tmp_path / "back")) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "mini_llama3"
    captured = capsys.readouterr()
    assert "LlamaForCausalLM" in captured.out
    # the length the run trained at travels with the conversions, so `eval` scores them in the same windows
    (src.parent / "config.yaml").write_text("stage: pretrain\nseq_len: 64\n")
    assert run_cli("export", "--to", "hf", str(src.parent), str(tmp_path / "hf64")) == 0
    assert run_cli("export", "--to", "minillm", str(tmp_path / "hf64"), str(tmp_path / "back64")) == 0
    from minillm.runs import trained_seq_len

    assert trained_seq_len(tmp_path / "hf64") == trained_seq_len(tmp_path / "back64") == 64
    assert trained_seq_len(tmp_path / "hf") is None  # from a run without a config: nothing recorded
    # transformers' own tqdm bars are off in the CLI (they would interleave with our output)
    assert "Loading weights" not in captured.err and "Writing model shards" not in captured.err


@pytest.mark.parametrize("name, own", [
    ("mini_llama3", {"loss_chunk_size": 77}),
    ("mini_deepseekv3", {"loss_chunk_size": 77, "bias_update_speed": 0.01, "seq_aux_alpha": 0.5,
                         "mtp_loss_lambda": 0.2}),
    ("mini_qwen3_next", {"loss_chunk_size": 77, "linear_chunk_size": 32, "full_attention_interval": 2}),
])
def test_export_and_back_keeps_our_own_config_fields(tmp_path, name, own):
    """Fields the reference config has no place for (training and speed knobs) travel in the export's config.json
    and come back with --to minillm instead of being reset to our defaults; the export still loads as the
    reference class."""
    from transformers import AutoConfig

    build_model(name, "tiny", vocab_size=VOCAB, **own).save_pretrained(tmp_path / "final")
    assert run_cli("export", "--to", "hf", str(tmp_path / "final"), str(tmp_path / "hf")) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["minillm"] == own
    assert AutoConfig.from_pretrained(tmp_path / "hf").model_type in ("llama", "deepseek_v3", "qwen3_next")
    assert run_cli("export", "--to", "minillm", str(tmp_path / "hf"), str(tmp_path / "back")) == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {key: back[key] for key in own} == own
    assert "minillm" not in back


@pytest.mark.parametrize("edit, message", [
    ({"minillm": {"loss_chunk_size": -5}}, "loss_chunk_size must be a positive integer"),
    ({"minillm": "oops"}, "config.json's 'minillm' must be an object"),
    ({"hidden_act": "gelu"}, "supports only SiLU"),
])
def test_import_of_a_config_we_cannot_take_is_one_line(tmp_path, capsys, edit, message):
    tiny_llama().save_pretrained(tmp_path / "final")
    assert run_cli("export", "--to", "hf", str(tmp_path / "final"), str(tmp_path / "hf")) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    capsys.readouterr()
    assert run_cli("export", "--to", "minillm", str(tmp_path / "hf"), str(tmp_path / "back")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'hf'}: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "back").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_bad_input(tmp_path, capsys):
    src = tmp_path / "final"
    tiny_llama().save_pretrained(src)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("user data")
    assert run_cli("export", str(src), str(occupied)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (occupied / "keep.txt").read_text() == "user data"
    assert run_cli("export", str(tmp_path / "missing"), str(tmp_path / "x")) == 2
    assert f"{tmp_path / 'missing'}: no such directory" in capsys.readouterr().err
    assert run_cli("export", str(occupied), str(tmp_path / "x")) == 2
    assert "not a model directory (no config.json), a finished run (final/) or a checkpoint" in capsys.readouterr().err
    assert run_cli("export", "--to", "gguf", str(src), str(tmp_path / "y")) == 2
    assert "choose 'hf' or 'minillm'" in capsys.readouterr().err
    assert run_cli("export", "--to", "minillm", str(src), str(tmp_path / "x")) == 2
    assert "already a minillm model (mini_llama3)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert run_cli("export", str(src), str(src / "sub")) == 2  # would be written into the model it converts
    assert "inside the model being converted" in capsys.readouterr().err
    assert not (src / "sub").exists()
    (tmp_path / "afile").write_text("user data")
    assert run_cli("export", str(src), str(tmp_path / "afile")) == 2
    assert "afile: a file; the destination is a new directory" in capsys.readouterr().err


def test_export_unloadable_model_is_a_one_line_error(tmp_path, capsys):
    truncated, mismatch = tmp_path / "truncated", tmp_path / "mismatch"
    for path in (truncated, mismatch):
        tiny_llama().save_pretrained(path)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((mismatch / "config.json").read_text())
    config["hidden_size"] += 8
    (mismatch / "config.json").write_text(json.dumps(config))
    for path, message in [
        (truncated, "cannot load the model: Error while deserializing header"),
        (mismatch, "cannot load the model: the weights' shapes do not match config.json\n"),
    ]:
        assert run_cli("export", "--to", "hf", str(path), str(tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_llama3_rope_checkpoint_imports_and_loads_back(tmp_path):
    """Real Llama 3.x checkpoints scale RoPE (`rope_type: llama3`). Its tables are computed while `from_pretrained`
    builds the model on the meta device: once, that left them without data and nothing could load the model."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters=rope)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ref")
    assert run_cli("export", "--to", "minillm", str(tmp_path / "ref"), str(tmp_path / "ours")) == 0
    assert run_cli("export", "--to", "hf", str(tmp_path / "ours"), str(tmp_path / "back")) == 0
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ref")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 320, (1, 200))  # beyond the 64 original positions, where llama3 scaling acts
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
