"""Block-by-block compression (``sequential.py``) on a tiny LLaMA: same results as all at once where no data is
involved, calibration on the compressed blocks' outputs, one block's calibration data and weights at a time,
sharded saves that reload exactly, and a killed run that resumes to the same bytes."""
from __future__ import annotations

import copy
import gc
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from structured_compress import sequential
from structured_compress.io import CompressedWriter, load_compressed, read_manifest
from structured_compress.io.dense_weights import DenseWeights
from structured_compress.io.save import dense_dtype
from structured_compress.sequential import BlockCalibration, compress_sequential, find_block_stack
from structured_compress.surgery import compress_

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
LINEARS_PER_BLOCK = 7
SVDQ_INT4 = {"bits": 4, "group_size": 16, "svd": False, "rounding": "gptq"}


def tiny_config(**overrides):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, **overrides)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def batches():
    return list(torch.randint(0, 100, (3, 2, 16), generator=torch.Generator().manual_seed(1)))


def forward(model, batch):
    return model(input_ids=batch, use_cache=False)


def test_finds_the_decoder_stack_and_only_when_it_holds_every_layer(tiny):
    names = [n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)]
    assert find_block_stack(tiny, [n for n in names if n.startswith("model.layers.")]) == "model.layers"
    assert find_block_stack(tiny, names) is None  # lm_head lies outside the blocks


def test_data_free_codec_gives_bit_identical_models(tiny, batches):
    together, by_block = copy.deepcopy(tiny), copy.deepcopy(tiny)
    compress_(together, "lowrank", 0.5, include="model.layers.*")
    report = compress_sequential(by_block, "lowrank", 0.5, include="model.layers.*")
    assert len(report.layers) == 4 * LINEARS_PER_BLOCK
    assert torch.equal(forward(together, batches[0]).logits, forward(by_block, batches[0]).logits)


def test_gram_matrices_are_collected_only_for_settings_that_use_them(tiny, batches, monkeypatch):
    seen = []
    original = sequential.compress_

    def spy(model, layer, *args, calibration=None, **kwargs):
        seen.extend((data["gram"], data["inputs"].shape) for data in calibration.values())
        return original(model, layer, *args, calibration=calibration, **kwargs)

    monkeypatch.setattr(sequential, "compress_", spy)
    compress_sequential(copy.deepcopy(tiny), "svdq", include="model.layers.*", options={"max_error": 0.05},
                        batches=batches, forward=forward)  # the rank search reads inputs only
    assert len(seen) == 4 * LINEARS_PER_BLOCK and all(gram is None for gram, _ in seen)
    assert all(shape[0] == 3 * 2 * 16 for _, shape in seen)  # every calibration token of the 3 batches


def test_each_block_calibrates_on_the_compressed_blocks_before_it(tiny, batches, monkeypatch):
    seen = {}
    original = sequential.compress_

    def spy(model, layer, *args, calibration=None, **kwargs):
        seen.update({name: data["gram"].clone() for name, data in calibration.items()})
        return original(model, layer, *args, calibration=calibration, **kwargs)

    monkeypatch.setattr(sequential, "compress_", spy)
    model = copy.deepcopy(tiny)
    compress_sequential(model, "svdq", include="model.layers.*", options=SVDQ_INT4, batches=batches,
                        forward=forward)
    for block in range(4):
        name = f"model.layers.{block}.self_attn.q_proj"
        on_compressed, on_dense = input_gram(model, name, batches), input_gram(tiny, name, batches)
        assert torch.allclose(seen[name], on_compressed, rtol=1e-9, atol=1e-9)
        assert (block == 0) == torch.allclose(seen[name], on_dense, rtol=1e-6, atol=1e-6)


def input_gram(model, name, batches):
    """sum x x^T (float64) over the inputs of the module ``name`` (dense or structured)."""
    grams = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: grams.append(args[0].reshape(-1, args[0].shape[-1]).double().T
                                          @ args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        for batch in batches:
            forward(model, batch)
    hook.remove()
    return sum(grams)


def test_never_more_calibration_entries_alive_than_one_block_has_linears(tiny, batches, monkeypatch):
    alive: list[weakref.ref] = []
    most = []
    close, original = BlockCalibration.close, sequential.compress_

    def tracked_close(self):
        data = close(self)
        alive.extend(weakref.ref(entry["gram"]) for entry in data.values())
        return data

    def counting(*args, **kwargs):
        gc.collect()
        most.append(len({id(ref()) for ref in alive if ref() is not None}))
        return original(*args, **kwargs)

    monkeypatch.setattr(BlockCalibration, "close", tracked_close)
    monkeypatch.setattr(sequential, "compress_", counting)
    compress_sequential(copy.deepcopy(tiny), "lowrank", 0.5, include="model.layers.*", options={"init": "whiten"},
                        batches=batches, forward=forward)
    # q/k/v and gate/up read one input each: 4 distinct Gram matrices per block, never two blocks' worth
    assert len(most) == 4 and max(most) == 4 <= LINEARS_PER_BLOCK


def write_checkpoint(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards and an index, as 7B checkpoints come
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive in the process (each storage once), whoever holds it."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


class MeasuredWeights(DenseWeights):
    """Records, after every read, the tensor bytes alive in the whole process (not only in the model)."""

    model = None
    peaks: list[int] = []
    outside_in_memory: list[bool] = []  # after every read: whether any tensor outside the blocks holds memory

    def load(self, module, prefix="", skip=()):
        super().load(module, prefix, skip)
        self.peaks.append(live_tensor_bytes())
        self.outside_in_memory.append(any(not p.is_meta for n, p in self.model.named_parameters()
                                          if not n.startswith("model.layers.")))


def sequential_save(folder: Path, checkpoint: Path, batches, weights_class=DenseWeights, config=None):
    from accelerate import init_empty_weights

    with init_empty_weights():  # as create_hf_model(..., empty_weights=True) builds it
        skeleton = transformers.AutoModelForCausalLM.from_config(config or tiny_config(), dtype=torch.float32).eval()
    weights = weights_class(checkpoint)
    weights.model = skeleton
    writer = CompressedWriter(folder, 5, None, dense_dtype(skeleton), {"test": "tiny"})
    report = compress_sequential(skeleton, "svdq", include="model.layers.*", options=SVDQ_INT4, batches=batches,
                                 forward=forward, weights=weights, writer=writer, release=True)
    writer.finish(skeleton, None, report, weights=weights)
    return weights


def test_blocks_load_one_at_a_time_and_the_shards_reload_bit_identically(tiny, batches, tmp_path):
    checkpoint = write_checkpoint(tiny, tmp_path / "dense")
    MeasuredWeights.peaks, MeasuredWeights.outside_in_memory = [], []
    before = live_tensor_bytes()
    sequential_save(tmp_path / "out", checkpoint, batches, MeasuredWeights)
    block_bytes = sum(t.nbytes for t in tiny.model.layers[0].state_dict().values())
    whole = sum(t.nbytes for t in tiny.state_dict().values())
    outside = whole - 4 * block_bytes
    # loads: the outside (to record block 0's inputs), then blocks 0-3 (the writer reads the outside again)
    grown = [peak - before for peak in MeasuredWeights.peaks]
    assert len(grown) == 5 and max(grown) < outside + 2 * block_bytes < whole, (grown, outside, block_bytes)
    # while the blocks are compressed, the outside is freed and at most about one dense block is alive
    assert MeasuredWeights.outside_in_memory == [True, False, False, False, False]
    assert max(grown[1:]) < 1.5 * block_bytes, (grown, outside, block_bytes)
    assert grown[4] - grown[1] < block_bytes / 2  # flat in depth: no block's dense weights are kept

    in_memory = copy.deepcopy(tiny)
    writer = CompressedWriter(tmp_path / "reference", 5, None, torch.float32, {"test": "tiny"})
    report = compress_sequential(in_memory, "svdq", include="model.layers.*", options=SVDQ_INT4, batches=batches,
                                 forward=forward, writer=writer)
    writer.finish(in_memory, None, report)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "compressed-00005-of-00005.safetensors" in files and "compressed.safetensors.index.json" in files
    for name in files:  # read lazily from disk or compressed in memory: the same bytes
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert len(read_manifest(tmp_path / "out")["shards"]) == 4
    reloaded = load_compressed(tmp_path / "out")
    assert torch.equal(forward(reloaded, batches[0]).logits, forward(in_memory, batches[0]).logits)


def test_a_tied_head_is_written_once_from_a_checkpoint_that_holds_it_under_either_name(batches, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = tiny_config(tie_word_embeddings=True)
    tied = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference = copy.deepcopy(tied)
    writer = CompressedWriter(tmp_path / "reference", 5, None, torch.float32, {"test": "tiny"})
    writer.finish(reference, None, compress_sequential(reference, "svdq", include="model.layers.*",
                                                       options=SVDQ_INT4, batches=batches, forward=forward,
                                                       writer=writer))
    for dropped in ("lm_head.weight", "model.embed_tokens.weight"):  # Gemma's converted checkpoint keeps the head
        (tmp_path / dropped).mkdir()
        save_file({k: v.clone() for k, v in tied.state_dict().items() if k != dropped},
                  tmp_path / dropped / "model.safetensors")
        sequential_save(tmp_path / f"out-{dropped}", tmp_path / dropped, batches, config=config)
        assert read_manifest(tmp_path / f"out-{dropped}")["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
        for name in sorted(p.name for p in (tmp_path / "reference").iterdir()):
            written = (tmp_path / f"out-{dropped}" / name).read_bytes()
            assert written == (tmp_path / "reference" / name).read_bytes(), name


def test_reads_in_chunks_equal_whole_reads_and_refuse_casts_that_overflow(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from structured_compress.io import dense_weights

    values = torch.randn(37, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    values[5, 3] = 1e6  # beyond float16
    save_file({"w": values, "b": values[0].clone()}, tmp_path / "model.safetensors")
    monkeypatch.setattr(dense_weights, "CHUNK_BYTES", 8 * 11 * 4)  # 4 rows at a time: 10 chunks, the last short
    weights = DenseWeights(tmp_path)
    assert torch.equal(weights.read("w", torch.float64), values)
    assert torch.equal(weights.read("w", torch.float32), values.float())  # cast chunk by chunk
    assert torch.equal(weights.read("b", torch.bfloat16), values[0].bfloat16())  # under one chunk: whole
    with pytest.raises(ValueError, match=r"'w' has values beyond float16's range.*float32 or bfloat16"):
        weights.read("w", torch.float16)


def test_finishing_without_the_checkpoint_for_freed_tensors_is_refused(tiny, tmp_path):
    skeleton = copy.deepcopy(tiny)
    sequential._move_outside(skeleton, "model.layers", torch.device("meta"), buffers=False)
    writer = CompressedWriter(tmp_path / "out", 1, None, torch.float32, {"test": "tiny"})
    with pytest.raises(ValueError, match="is on the meta device: pass weights="):
        writer.finish(skeleton)


def test_a_tampered_shard_is_refused(tiny, batches, tmp_path):
    sequential_save(tmp_path / "out", write_checkpoint(tiny, tmp_path / "dense"), batches)
    shard = tmp_path / "out" / "compressed-00002-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="compressed-00002-of-00005.safetensors failed its sha256 check"):
        load_compressed(tmp_path / "out")


KILLED_JOB = """
import os, signal, sys, torch
sys.path[:0] = [{root!r}, {src!r}]
from structured_compress.io import CompressedWriter
from tests.test_sequential import sequential_save
write_part = CompressedWriter.write_part
def write_then_die(self, *args, **kwargs):
    part = write_part(self, *args, **kwargs)
    if len(self.written) == int(os.environ.get("KILL_AFTER_BLOCKS", 0)):
        os.kill(os.getpid(), signal.SIGKILL)
    return part
CompressedWriter.write_part = write_then_die
batches = list(torch.randint(0, 100, (3, 2, 16), generator=torch.Generator().manual_seed(1)))
sequential_save(sys.argv[1], sys.argv[2], batches)
"""


def test_a_run_killed_after_block_2_resumes_to_the_same_bytes(tiny, tmp_path):
    checkpoint = write_checkpoint(tiny, tmp_path / "dense")
    script = tmp_path / "job.py"
    script.write_text(KILLED_JOB.format(root=str(ROOT), src=str(ROOT / "src")))

    def job(folder, kill_after=0):
        env = {**os.environ, "KILL_AFTER_BLOCKS": str(kill_after), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, str(script), str(folder), str(checkpoint)], env=env,
                              capture_output=True, text=True, timeout=300)

    straight = job(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = job(tmp_path / "killed", kill_after=2)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        "compressed-00001-of-00005.safetensors", "compressed-00002-of-00005.safetensors"]
    resumed = job(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())
    for name in names:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_a_part_from_another_run_is_refused(tiny, batches, tmp_path):
    sequential_save(tmp_path / "out", write_checkpoint(tiny, tmp_path / "dense"), batches)
    (tmp_path / "out" / "manifest.json").unlink()
    writer = CompressedWriter(tmp_path / "out", 5, None, torch.float32, {"test": "another"})
    with pytest.raises(ValueError, match="was written by another run"):
        writer.done_part(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_compress_on_the_gpu_and_wait_on_the_cpu(tiny, batches):
    on_cpu, on_gpu = copy.deepcopy(tiny), copy.deepcopy(tiny)
    compress_sequential(on_cpu, "lowrank", 0.5, include="model.layers.*", options={"init": "whiten"},
                        batches=batches, forward=forward)
    torch.cuda.reset_peak_memory_stats()
    compress_sequential(on_gpu, "lowrank", 0.5, include="model.layers.*", options={"init": "whiten"},
                        batches=batches, forward=forward, device="cuda")
    assert torch.cuda.max_memory_allocated() > 0
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())  # each block went back after its turn
    torch.testing.assert_close(forward(on_gpu, batches[0]).logits, forward(on_cpu, batches[0]).logits,
                               rtol=1e-3, atol=1e-3)
