"""bench.py and benchmarks/: the counting, the FLOP formula, the generation methods and quick smoke runs;
no timing."""
import json
import math

import pytest
import torch

import bench
from benchmarks import common, hf_race, speedrun, trl_race
from conftest import TOKENIZER_DIR, tiny_config
from model import Transformer
from logger import measure_matmul_flops


def test_count_useful_tokens_skips_the_first_position_and_minus_100():
    labels = torch.tensor([[5, 6, 7, 8, -100, -100],     # positions 1..3 carry loss: 3
                           [-100, 1, 2, -100, 3, 4],     # 1, 2, 4, 5: 4 (the first never does)
                           [9, -100, -100, -100, -100, -100]])  # 0
    assert hf_race.count_useful_tokens({"input_ids": labels.clamp(min=0), "labels": labels}) == 7


def shipped_training_texts(path):
    """The texts PretrainDataset trains on, read here without dataset.py: all but every 200th line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for number, line in enumerate(f, 1) if number % 200 != 0]


def test_padded_pipeline_counts_each_document_up_to_max_len(tokenizer, pretrain_file):
    max_len, batch_size = 64, 8
    texts = shipped_training_texts(pretrain_file)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]  # + eos
    assert any(n > max_len for n in lengths) and any(n < max_len for n in lengths)  # both cases occur
    expected = sum(min(n, max_len) - 1 for n in lengths)

    batches = list(hf_race.padded_batches(hf_race.training_texts(pretrain_file), tokenizer, max_len, batch_size))
    assert sum(len(b["labels"]) for b in batches) == len(texts)
    assert all(b["input_ids"].shape == (batch_size, max_len) for b in batches[:-1])
    assert sum(hf_race.count_useful_tokens(b) for b in batches) == expected
    # Row by row: the document, eos when it fits, then padding that carries no loss.
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [eos]
    row_ids, row_labels = batches[0]["input_ids"][0], batches[0]["labels"][0]
    n = min(len(first), max_len)
    assert row_ids[:n].tolist() == first[:n] and row_labels[:n].tolist() == first[:n]
    assert (row_labels[n:] == -100).all() and (row_ids[n:] == tokenizer.pad_token_id).all()

    per_row, first_batch = hf_race.useful_per_row(iter(batches))
    assert per_row == pytest.approx(expected / len(texts))
    assert first_batch is batches[0]


def test_packed_pipeline_has_every_position_useful(tokenizer, pretrain_file):
    per_row, batch = hf_race.useful_per_row(hf_race.packed_batches(pretrain_file, tokenizer, 64, 4))
    assert per_row == 63 and batch["input_ids"].shape == (4, 64)


def test_flops_per_token_by_hand(tokenizer):
    config = tiny_config(len(tokenizer))  # dim 64, 2 layers, 4 heads, 2 kv heads (head_dim 16)
    assert config.hidden_dim == 192  # 2/3 of 4 x 64 = 170, rounded up to a multiple of 64
    per_layer = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # wq, wk, wv (2 kv heads x 16), wo
                 + 3 * 64 * 192)  # w1, w2, w3
    matmul_weights = 2 * per_layer + len(tokenizer) * 64  # the lm_head, tied to the embedding: once
    seq = 128
    expected = 6 * matmul_weights + 6 * 2 * 64 * seq  # causal attention: 6 x n_layers x dim x seq
    assert Transformer(config).flops_per_token(seq) == expected
    # MFU: flops_per_token x tokens/s over the peak.
    train = {"flops_per_token": expected, "peak_flops": 1e9, "tokens_per_s": {"ours": 1000.0, "hf": 500.0}}
    train["peak_dtype"] = "fp32"
    assert hf_race.mfu(train)["mfu"] == pytest.approx({"ours": expected * 1e-6, "hf": expected * 5e-7})


@pytest.mark.slow
def test_the_generation_methods_give_the_same_tokens(tokenizer):
    device = torch.device("cpu")
    ours, hf = hf_race.ours_and_hf(tiny_config(len(tokenizer)), device, seed=0, init=hf_race.natural_scale_init)
    prompt = torch.tensor([tokenizer("《静夜思》 李白", add_special_tokens=False)["input_ids"]])
    methods = hf_race.generation_methods(ours, hf, prompt, 40, device, compile=True)
    outputs = {name: fn() for name, fn in methods.items()}
    assert set(outputs) == {"ours", "hf", "recompute", "ours_compiled"}
    assert outputs["ours"].shape == (1, prompt.shape[1] + 40)
    assert torch.equal(outputs["ours"][:, :prompt.shape[1]], prompt)
    for name in ("hf", "recompute", "ours_compiled"):
        assert torch.equal(outputs["ours"], outputs[name]), name
    assert len(set(outputs["ours"][0, prompt.shape[1]:].tolist())) > 1  # a check with something to check
    assert hf_race.first_difference(outputs["ours"], outputs["hf"]) is None
    changed = outputs["ours"].clone()
    changed[0, -3] += 1
    assert hf_race.first_difference(outputs["ours"], changed) == changed.shape[1] - 3


def test_race_alternates_and_keeps_the_first_outputs():
    calls = []
    contenders = {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or len(calls)}
    seconds, first = common.race(contenders, torch.device("cpu"), rounds=(3, 3), budget_s=0, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then the order flips each round
    assert {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3} and first == {"a": 3, "b": 4}


@pytest.mark.slow
def test_quick_json_run_reports_every_section(pretrain_file, capsys, monkeypatch):
    peak_calls = []

    def spy(*args, **kwargs):
        peak_calls.append(kwargs)
        return measure_matmul_flops(*args, **kwargs)
    monkeypatch.setattr(hf_race, "measure_matmul_flops", spy)
    results = bench.main(["--quick", "--json", "--config", "tiny", "--data_path", pretrain_file,
                          "--tokenizer_path", TOKENIZER_DIR])
    # MFU's peak is measured by training's own method: its matmul size and timing, not the bench's.
    assert peak_calls and all("size" not in kwargs for kwargs in peak_calls)
    printed = json.loads(capsys.readouterr().out)
    assert printed["errors"] == {}
    assert printed["rows"] == json.loads(json.dumps(results["rows"]))
    for key in ("machine", "config", "train", "useful_tokens", "generation", "data_prep", "mfu"):
        assert key in printed, key
    assert {"cpu", "cores", "torch", "device"} <= set(printed["machine"])
    assert printed["config"]["dim"] == 64 and printed["config"]["n_layers"] == 2
    assert printed["train"]["same_loss"] and printed["train"]["seq_len"] == 64
    assert printed["generation"]["identical"] == {"hf": True, "recompute": True}
    assert printed["useful_tokens"]["useful_per_batch"]["packed"] == 2 * 127  # batch 2 x (128 - 1)
    assert printed["data_prep"]["blocks"] > 0 and printed["data_prep"]["mb_per_s"] > 0
    data = printed["data_prep"]
    assert data["cache_tokens"] > 0 and data["loader_tokens_per_s"] > 0 and data["cache_build_tokens_per_core_s"] > 0
    assert set(data["cache_build_tokens_per_s"]) == {"1", "2"}
    sections = {row["section"][0] for row in printed["rows"]}
    assert sections == {"1", "2", "3", "4", "5"}
    for row in printed["rows"]:
        assert row["ours"] > 0
        assert (row["goal"] is None) == (row["result"] is None)
        if row["goal"] is not None:
            assert row["result"] == (row["ratio"] >= row["goal"])


def test_matmul_floors_do_the_models_weight_matmuls_and_nothing_else(tokenizer):
    """The ceilings of sections 1 and 3 replay exactly the weight matmuls: 6 FLOPs per weight and
    token for a training step (the FLOP formula without attention), 2 per weight and new token."""
    from torch.utils.flop_counter import FlopCounterMode
    model = Transformer(tiny_config(len(tokenizer)))
    seq = 128
    matmul_weights = (model.flops_per_token(seq) - 6 * model.config.n_layers * model.config.dim * seq) // 6
    assert sum(w.numel() for w in hf_race.linear_weights(model)) == matmul_weights
    for run, expected in [(hf_race.train_matmuls(model, tokens=96), 6 * matmul_weights * 96),
                          (hf_race.decode_matmuls(model, new_tokens=5), 2 * matmul_weights * 5)]:
        with FlopCounterMode(display=False) as counter:
            run()
        assert counter.get_total_flops() == expected


@pytest.mark.slow
def test_each_section_prints_as_it_is_measured_and_a_failure_spares_the_others(pretrain_file, capsys,
                                                                              monkeypatch):
    """A GPU run must leave numbers behind: rows go out as each section ends, and a section that raises
    prints its error while the sections after it still run."""
    printed_before = {}
    real_useful = hf_race.bench_useful_tokens

    def failing_generation(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    def useful_tokens(*args, **kwargs):
        printed_before["useful_tokens"] = capsys.readouterr().out
        return real_useful(*args, **kwargs)
    monkeypatch.setattr(hf_race, "bench_generation", failing_generation)
    monkeypatch.setattr(hf_race, "bench_useful_tokens", useful_tokens)
    results = bench.main(["--quick", "--config", "tiny", "--data_path", pretrain_file,
                          "--tokenizer_path", TOKENIZER_DIR])
    earlier = printed_before["useful_tokens"]
    assert "1 train step" in earlier and "5 MFU" in earlier and "4 data prep" in earlier
    assert "2 useful tokens" not in earlier
    later = capsys.readouterr().out
    assert "2 useful tokens" in later
    assert "3/5 generation: FAILED: RuntimeError: no kernel image is available" in later
    assert results["errors"] == {"generation": "RuntimeError: no kernel image is available"}
    assert {r["section"][0] for r in results["rows"]} == {"1", "2", "4", "5"}


def test_matmul_peak_waits_for_the_device_once_per_doubling_batch(monkeypatch):
    """On a GPU a synchronize after every matmul would time the launch and the wait, not the matmul
    (an H200 does a 1024^3 matmul in microseconds): the matmuls are queued in batches that double."""
    import logger
    syncs = []
    monkeypatch.setattr(logger, "synchronize", lambda device: syncs.append(device))

    class CountMatmuls(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountMatmuls.calls += func in (torch.Tensor.matmul, torch.Tensor.__matmul__, torch.matmul)
            return func(*args, **(kwargs or {}))
    with CountMatmuls():
        flops = logger.measure_matmul_flops(torch.device("cpu"), torch.float32, seconds=0.3)
    runs = CountMatmuls.calls - 1  # the warm-up
    assert flops > 0 and runs >= 2
    assert len(syncs) == 1 + math.ceil(math.log2(runs + 1))  # after the warm-up, then once per batch


def test_time_to_reach_interpolates_between_evaluations():
    points = [(10.0, 3.0), (20.0, 2.0), (30.0, 1.5)]
    assert speedrun.time_to_reach(points, 2.5) == pytest.approx(15.0)  # halfway from 3.0 to 2.0
    assert speedrun.time_to_reach(points, 2.0) == pytest.approx(20.0)
    assert speedrun.time_to_reach(points, 3.5) == pytest.approx(10.0)  # already there at the first evaluation
    assert speedrun.time_to_reach(points, 1.0) is None


@pytest.mark.slow
def test_quick_speedrun_trains_both_recipes_and_compares_them(pretrain_file, tmp_path, capsys):
    results = bench.main(["--speedrun", "adamw-cosine,muon-wsd", "--quick", "--json", "--data_path", pretrain_file,
                          "--tokenizer_path", TOKENIZER_DIR, "--speedrun_dir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out)["final_bpb"] == results["final_bpb"]
    for name in ("adamw-cosine", "muon-wsd"):
        points = results["points"][name]
        assert [len(p) for p in points] == [2, 2, 2]  # evaluations at steps 2, 4 and 6
        assert all(b > 0 for _, b in points) and points[0][0] < points[-1][0]
        assert (tmp_path / name / "model.safetensors").is_file()  # kept for report.py
    target = max(results["final_bpb"].values())
    assert results["target_bpb"] == target
    times = results["time_to_target"]
    assert results["time_ratio"] == pytest.approx(times["muon-wsd"] / times["adamw-cosine"])


@pytest.mark.slow
def test_quick_trl_race_starts_from_the_same_losses_as_trl(capsys):
    """TRL is the oracle: on the same weights and batch, its SFTTrainer (assistant_only_loss), DPOTrainer,
    SFTTrainer + PEFT and GKDTrainer compute the first step's loss (and DPO's log-probabilities) that ours do."""
    results = bench.main(["--trl", "--quick", "--json", "--config", "tiny", "--tokenizer_path", TOKENIZER_DIR])
    assert json.loads(capsys.readouterr().out)["rows"].keys() == results["rows"].keys()
    rows = results["rows"]
    assert list(rows) == ["SFT (SFTTrainer)", "DPO (DPOTrainer)", "LoRA SFT (SFTTrainer+PEFT)",
                          "Distillation (GKDTrainer)"]
    for name, r in rows.items():
        assert r["same_loss"], name
        assert r["first"]["ours"] == pytest.approx(r["first"]["trl"], abs=1e-4), name
        assert r["tokens_per_s"]["ours"] > 0 and r["tokens_per_s"]["trl"] > 0
    # TRL's own chat-template tokenization and assistant masks give exactly our SFT batch.
    assert rows["SFT (SFTTrainer)"]["same_batch"] and rows["LoRA SFT (SFTTrainer+PEFT)"]["same_batch"]
    # Nothing is compared trivially: the SFT loss is a random model's (about ln vocab), the LoRA run's
    # adapters change it, and DPO's loss starts at ln 2 (policy = reference) with real log-probabilities.
    sft_loss = rows["SFT (SFTTrainer)"]["first"]["ours"][0]
    assert sft_loss > 5 and abs(rows["LoRA SFT (SFTTrainer+PEFT)"]["first"]["ours"][0] - sft_loss) > 1e-3
    dpo_loss, logp_chosen, logp_rejected = rows["DPO (DPOTrainer)"]["first"]["ours"]
    assert dpo_loss == pytest.approx(math.log(2), abs=1e-6) and logp_chosen < -10 and logp_rejected < -10
    assert rows["Distillation (GKDTrainer)"]["first"]["ours"][0] > 1e-3  # a random student is far from its teacher
    assert all(common.format_row(r).startswith("TRL race") for r in trl_race.trl_rows(results))
