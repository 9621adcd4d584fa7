"""`minillm info` and the parameter / FLOPs counts behind it."""

import pytest

from cli.main import main as cli_main
from minillm.models.registry import build_model
from minillm.models.stats import config_stats, model_stats


def run_cli(*argv):
    with pytest.raises(SystemExit) as exc:
        cli_main(list(argv))
    return exc.value.code


def test_llama_base_counts_by_hand():
    s = config_stats("mini_llama3", "base", seq_len=1024)
    d, f, v, layers, heads, kv, hd = 768, 2048, 32004, 12, 12, 4, 64
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d  # q,o + k,v + MLP + 2 norms
    non_embedding = layers * per_layer + d  # + final norm
    assert s.embedding == 2 * v * d  # untied head
    assert s.non_embedding == non_embedding and s.activated_non_embedding == non_embedding
    assert s.total == s.activated == non_embedding + 2 * v * d
    assert 100e6 <= s.total <= 200e6
    assert s.mtp == 0
    assert s.flops_per_token == 6 * non_embedding + 6 * v * d + 6 * layers * heads * (2 * hd) * 1024


def test_tiny_is_under_5m_and_meta_counts_equal_real():
    real = model_stats(build_model("mini_llama3", "tiny"))
    assert real == config_stats("mini_llama3", "tiny")
    assert real.total < 5e6


def test_info_prints_table(capsys):
    assert run_cli("info", "--model", "mini_llama3", "--preset", "base", "--seq-len", "1024") == 0
    out = capsys.readouterr().out
    s = config_stats("mini_llama3", "base", seq_len=1024)
    assert f"{s.total:,}" in out and f"{s.flops_per_token:,}" in out and "seq 1024" in out


def test_info_unknown_names(capsys):
    assert run_cli("info", "--model", "gpt5") == 2
    err = capsys.readouterr().err
    assert "mini_llama3, mini_deepseekv3, mini_qwen3_next" in err
    assert run_cli("info", "--model", "mini_llama3", "--preset", "huge") == 2
    assert "known presets: tiny, base" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_preset_sizes_of_every_model(name):
    tiny, base = config_stats(name, "tiny"), config_stats(name, "base")
    assert tiny.total < 5e6
    assert 100e6 <= base.total <= 200e6
    for s in (tiny, base):
        assert s.total == s.embedding + s.non_embedding + s.mtp
        assert s.activated_non_embedding <= s.non_embedding
        if name == "mini_llama3":
            assert s.activated == s.total and s.mtp == 0
        else:  # MoE: only top-k routed experts run per token
            assert s.activated_non_embedding < s.non_embedding
        assert (s.mtp > 0) == (name == "mini_deepseekv3")


def test_moe_activated_counts_only_top_k_routed_experts():
    """With every expert chosen per token, activated equals the inference total; with fewer, the difference is
    exactly the unchosen share of the routed experts' weights."""
    from minillm.models.layers.moe import RoutedExperts

    model = build_model("mini_qwen3_next", "tiny")
    s = model_stats(model)
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    routed = sum(p.numel() for m in experts for p in m.parameters())
    k, e = model.config.num_experts_per_tok, experts[0].num_experts
    assert s.non_embedding - s.activated_non_embedding == routed - routed * k // e
