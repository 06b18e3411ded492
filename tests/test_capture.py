"""Key capture: manifests of seen keys, merged across processes, replayed with faithful arguments."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

import kernels_serving as ks
import tunevault
from conftest import count_launches, in_fork, run_py
from kernels_serving import chunk_cumsum, chunk_size, reference_cumsum, scale_rows, serve
from tunevault.capture import manifest as mf
from tunevault.capture.replay import WarmupItem, rebuild
from tunevault.integration import triton_adapter
from tunevault.store.sqlite import SqliteStore


def test_capture_records_keys_outcomes_and_argspecs(tv, tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path) as rec:
        for lens in ([10], [12], [20, 5], [50, 64, 3], [9]):
            serve(lens)
        assert triton_adapter._hit_hook == rec.hit
    assert triton_adapter._hit_hook is None  # the non-capturing hot path is back
    lines = path.read_text().splitlines()
    assert all(json.loads(line)["format"] == mf.FORMAT for line in lines)  # human-readable JSON lines
    entries = mf.read(path)
    by_bt = {dict(e.key.items)["BT"]: e for e in entries}
    assert sorted(by_bt) == [16, 32, 64]
    assert {e.kernel for e in entries} == {"kernels_serving:chunk_cumsum"}
    assert by_bt[16].counts == {"hit": 2, "tuned": 1, "missed": 0} and by_bt[16].count == 3
    assert by_bt[64].counts == {"hit": 0, "tuned": 1, "missed": 0}
    assert by_bt[16].first_seen <= by_bt[16].last_seen
    cu = next(a for a in by_bt[64].callspec["args"] if a.get("dtype") == "int32")
    assert cu["values"] == [0, 50, 114, 117]  # cu_seqlens kept verbatim
    serve([10])  # after the block: not recorded
    assert mf.read(path)[0].count == 3


def test_missed_keys_are_counted_as_missed_on_every_call(tv, tmp_path: Path) -> None:
    serve([10], dtype=torch.float16)
    tv.seal("fallback")
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        for _ in range(3):
            serve([10], dtype=torch.float32)  # first via the miss path, then in-memory fallback hits
        serve([10], dtype=torch.float16)
    counts = {dict(e.key.items)["dtype(g)"]: e.counts for e in mf.read(path)}
    assert counts == {"float32": {"hit": 0, "tuned": 0, "missed": 3},
                      "float16": {"hit": 1, "tuned": 0, "missed": 0}}


def test_settings_capture_flushes_periodically_and_at_uninstall(sqlite_url: str, tmp_path: Path) -> None:
    path = tmp_path / "env.jsonl"
    tunevault.install(mode="tune", store=sqlite_url, capture=str(path))
    from tunevault.capture import recorder

    [active] = recorder._feeding()
    assert active.path == str(path)
    serve([10])
    assert active.flush() == 1 and mf.read(path)[0].count == 1
    serve([10])
    tunevault.uninstall()
    assert [e.count for e in mf.read(path)] == [2]  # two lines, merged
    assert len(path.read_text().splitlines()) == 2


def test_keys_met_inside_a_capture_block_reach_the_settings_manifest_too(sqlite_url: str, tmp_path: Path) -> None:
    """TUNEVAULT_CAPTURE is the server-wide manifest: a capture() block (a profiling helper) records its
    keys as well, never instead of it; a block into the same file counts each call once."""
    from tunevault.capture import recorder

    server, block = tmp_path / "server.jsonl", tmp_path / "block.jsonl"
    tunevault.install(mode="tune", store=sqlite_url, capture=str(server))
    settings = recorder._from_settings
    assert settings is not None
    serve([10])  # outside any block: BT=16
    with tunevault.capture(block, flush_interval=0) as rec:
        hook_inside = triton_adapter._hit_hook
        serve([50, 64, 3])  # first met inside the block (miss path): BT=64
        serve([50, 64, 3])  # an in-memory hit
        serve([10])  # an in-memory hit of a key met before the block
    hook_after = triton_adapter._hit_hook
    with tunevault.capture(server, flush_interval=0):  # the settings' own file: each call counted once
        serve([10])
    tunevault.uninstall()
    counts = {path.name: {dict(e.key.items)["BT"]: e.count for e in mf.read(path)} for path in (server, block)}
    assert counts == {"server.jsonl": {16: 3, 64: 2}, "block.jsonl": {64: 2, 16: 1}}
    assert all(e.callspec is not None for e in mf.read(server))  # warmup can replay the block's key
    assert hook_inside not in (None, rec.hit, settings.hit)  # both fed while the block runs
    assert hook_after == settings.hit  # one recorder: its own hook, no loop


def test_a_forked_child_writes_only_the_keys_it_met_itself(tv, tmp_path: Path) -> None:
    """DataLoader or pool workers forked while capturing: an idle one writes nothing, a busy one one
    line per key it met, with its own count; the parent's lines (and ArgSpecs) are not repeated."""
    import os

    path = tmp_path / "keys.jsonl"

    def child(lens: list[list[int]]) -> dict[str, Any]:
        for length in lens:
            serve(length)
        return {"pid": os.getpid(), "lines": rec.flush()}

    with tunevault.capture(path, flush_interval=0) as rec:
        serve([10])  # BT=16
        serve([50, 64, 3])  # BT=64
        assert rec.flush() == 2
        serve([20, 5])  # BT=32, not flushed yet when the workers fork
        idle = in_fork(lambda: child([]))
        busy = in_fork(lambda: child([[10], [10]]))
        late = in_fork(lambda: child([[20, 5]]))
    assert (idle["lines"], busy["lines"], late["lines"]) == (0, 1, 1), (idle, busy, late)
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert len(lines) == 5 and all(line["count"] > 0 for line in lines)
    by_bt = {dict(e.key.items)["BT"]: e for e in mf.read(path)}
    assert {bt: e.count for bt, e in by_bt.items()} == {16: 3, 64: 1, 32: 2}
    pids = {bt: {pid for _host, pid in e.processes} for bt, e in by_bt.items()}
    assert pids == {16: {os.getpid(), busy["pid"]}, 64: {os.getpid()}, 32: {os.getpid(), late["pid"]}}
    specs = {(line["pid"], dict(map(tuple, line["key"]))["BT"]) for line in lines if "callspec" in line}
    # the parent had written BT=16's ArgSpec before the fork; BT=32's not yet, so the child that met it writes it too
    assert specs == {(os.getpid(), 16), (os.getpid(), 64), (os.getpid(), 32), (late["pid"], 32)}


CHILD = """
import json, os, tunevault, kernels_serving as k
tunevault.install()  # mode, store and capture from TUNEVAULT_*
for _ in range(5):
    k.serve([20, 5])
k.serve([3])
print(json.dumps(os.getpid()))
"""  # no explicit flush: the atexit hook writes the manifest


def test_several_processes_append_to_one_manifest_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    env = {"TUNEVAULT_MODE": "tune", "TUNEVAULT_STORE": f"sqlite:///{tmp_path / 's.db'}",
           "TUNEVAULT_CAPTURE": str(path)}
    pids: list[int] = []
    threads = [threading.Thread(target=lambda: pids.append(run_py(CHILD, **env))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pids) == 2
    entries = {dict(e.key.items)["BT"]: e for e in mf.read(path)}
    assert entries[32].count == 10 and entries[16].count == 2
    assert {pid for _host, pid in entries[32].processes} == set(pids)
    assert entries[32].counts["tuned"] >= 1  # the others found it in the shared store or tuned it too


def test_malformed_lines_are_skipped_with_a_warning(tv, tmp_path: Path, caplog) -> None:
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        serve([10])
    with path.open("a") as fh:
        fh.write('{"format": "tunevault-manifest/1", "kernel": "m:k", "key": "not a list"}\n{"trunc')
    assert [e.count for e in mf.read(path)] == [1]
    assert "skipped 2 malformed line(s)" in caplog.text


def test_index_tensors_replay_faithfully(tv, tmp_path: Path) -> None:
    """cu_seqlens/chunk_indices index memory: replayed values must be the captured ones."""
    path = tmp_path / "keys.jsonl"
    lengths = [7, 33, 5, 19]  # BT=64; chunks of unequal sequences
    with tunevault.capture(path):
        serve(lengths)
    (entry,) = mf.read(path)
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'fresh.db'}")  # replay tunes from scratch
    autotuner, args, kwargs = rebuild(entry)
    assert autotuner is chunk_cumsum.fn
    g, o, cu, chunk_indices = args[:4]
    assert cu.tolist() == [0, 7, 40, 45, 64] and cu.dtype == torch.int32
    assert chunk_indices.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert kwargs["BT"] == chunk_size(max(lengths))
    o.fill_(float("nan"))
    with count_launches(autotuner) as launches:
        autotuner.run(*args, **kwargs)  # benchmarks every config on the rebuilt args, then launches
    assert launches.count > len(autotuner.configs)
    # wrong offsets would read other sequences' tokens (or memory outside g) and leave NaNs in o
    torch.testing.assert_close(o, reference_cumsum(g, cu, kwargs["BT"]))
    assert tunevault.check([entry]).ok


def _sealed_serve(store: Path, call: str) -> dict[str, int]:
    """Run ``call`` (Python using ``ks``, ``torch``) in a fresh process sealed on ``store`` with
    on_miss="error": a key warmup did not decide raises TuningMiss there."""
    code = ("import json, torch, tunevault, kernels_serving as ks\n"
            f"tunevault.install(store='sqlite:///{store}', on_miss='error')\n"
            "tunevault.seal(on_miss='error')\n"
            f"{call}\n"
            "total = tunevault.stats()['kernels']['total']\n"
            "print(json.dumps({k: sum(phase[k] for phase in total.values()) for k in ('hits', 'misses')}))")
    return run_py(code, timeout=120)


def test_strided_index_tensors_replay_their_values(tv, tmp_path: Path) -> None:
    """Index tensors that are views (a transpose, a stepped slice, ``cu_seqlens`` as the column
    of packed ``[N + 1, 2]`` metadata) are rebuilt with their strides and the captured value at
    every element: the replayed kernel sums the captured sequences, and serving finds the key."""
    from tunevault.capture.argspec import ArgSpec

    table = torch.tensor([[0, 5, 9], [1, 2, 3]], dtype=torch.int32)
    for view in (table.t(), torch.arange(10, dtype=torch.int64)[::2], table[:, 1:].t(),
                 torch.tensor([4], dtype=torch.int32).expand(3)):
        back = ArgSpec.from_json(json.loads(json.dumps(ArgSpec.of(view).to_json()))).build(slack=32)
        assert isinstance(back, torch.Tensor)
        assert back.tolist() == view.tolist() and back.stride() == view.stride(), (view, back)

    meta = torch.tensor([[0, 0], [7, 1], [40, 2], [45, 3]], dtype=torch.int32)  # cu_seqlens, sequence id
    x = torch.randn(45, 20)
    torch.testing.assert_close(ks.sum_sequences(x, meta[:, 0]), ks.reference_sums(x, meta[:, 0]))
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.sum_sequences(x, meta[:, 0])
    (entry,) = mf.read(path)
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'fresh.db'}")
    autotuner, args, kwargs = rebuild(entry)
    rx, out, cu = args[:3]
    assert cu.tolist() == [0, 7, 40, 45] and cu.stride() == (2,)
    autotuner.run(*args, **kwargs)
    torch.testing.assert_close(out, ks.reference_sums(rx, cu))

    store = tmp_path / "warm.db"
    assert set(_warmup_fresh(path, store).values()) == {("tuned", "")}
    tunevault.uninstall()
    call = ("meta = torch.tensor([[0, 0], [7, 1], [40, 2], [45, 3]], dtype=torch.int32)\n"
            "ks.sum_sequences(torch.randn(45, 20), meta[:, 0])")
    assert _sealed_serve(store, call) == {"hits": 1, "misses": 0}


def test_a_manifest_from_a_gpu_host_says_to_pass_device_cpu(tv, tmp_path: Path) -> None:
    """Lines captured on ``cuda:3`` replayed on a host without CUDA: one short reason naming
    ``--device cpu`` (not torch's page about ATen_cuda); with it, warmup tunes the key."""
    import subprocess
    import sys

    from conftest import subprocess_env

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.scale_rows(2, 300)
    remote = tmp_path / "remote.jsonl"
    remote.write_text(path.read_text().replace('"device": "cpu"', '"device": "cuda:3"'))
    assert '"cuda:3"' in remote.read_text()

    def warmup(*extra: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", "memory://", "warmup",
                               str(remote), "--json", *extra], capture_output=True, text=True, timeout=180,
                              env=subprocess_env())
        (item,) = json.loads(proc.stdout[proc.stdout.index("{"):])["items"]
        return item

    item = warmup()
    assert item["status"] == "skipped" and "--device cpu" in item["reason"], item
    assert len(item["reason"]) < 300 and "\n" not in item["reason"], item["reason"]
    assert warmup("--device", "cpu")["status"] == "tuned"


def test_warmup_and_check_explain_keys_they_cannot_replay(tv, tmp_path: Path, capsys) -> None:
    from tunevault.cli.main import main

    @triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32)], key=["n"])
    @triton.jit
    def _local_copy(x, y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        serve([10])
        x = torch.randn(40)
        _local_copy[lambda m: (triton.cdiv(40, m["BLOCK"]),)](x, torch.empty_like(x), 40)
    good = json.loads(path.read_text().splitlines()[0])
    broken = dict(good, key=[*good["key"][:3], ["REVERSE", True], *good["key"][4:]])
    broken["callspec"] = dict(good["callspec"], args=[dict(good["callspec"]["args"][0], dtype="float99"),
                                                      *good["callspec"]["args"][1:]])
    gone = dict(good, kernel="no_such_module:kernel")
    mf.append(path, [json.dumps(broken) + "\n", json.dumps(gone) + "\n"])

    report = tunevault.warmup(path)
    status = {(i.kernel, dict(i.key.items).get("REVERSE")): (i.status, i.reason) for i in report.items}
    assert status[("kernels_serving:chunk_cumsum", False)] == ("decided", "")
    assert status[("kernels_serving:chunk_cumsum", True)][0] == "skipped"
    assert "argspec invalid" in status[("kernels_serving:chunk_cumsum", True)][1]
    assert "kernel not importable" in status[("no_such_module:kernel", False)][1]
    local = next(i for i in report.items if "_local_copy" in i.kernel)
    assert local.status == "skipped" and "defined inside a function" in local.reason
    assert not report.ok and report.counts() == {"tuned": 0, "decided": 1, "skipped": 3, "failed": 0}

    assert main(["check", str(path), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["decided"] == 1 and len(result["missing"]) == 3
    reasons = {(m["kernel"], dict(map(tuple, m["key"])).get("REVERSE")): m["reason"]
               for m in result["missing"]}
    assert "kernel not importable" in reasons[("no_such_module:kernel", False)]
    assert "differs in REVERSE: False -> True" in reasons[("kernels_serving:chunk_cumsum", True)]


def test_non_finite_float_arguments_are_captured_and_replayed(tv, tmp_path: Path) -> None:
    """-inf (a common mask value), inf and nan have no JSON number: the ArgSpec writes them as tagged
    text. Such a call once made the flush raise out of the block with no line written for any key."""
    import kernels_engine as ke

    path = tmp_path / "keys.jsonl"
    x = torch.randn(40)
    with tunevault.capture(path, flush_interval=0):
        serve([10])
        assert torch.equal(ke.run_clamp(x, float("-inf"), float("inf")), x)
        ke.run_clamp(x[:20], -1.0, float("nan"))
    entries = {(e.kernel, dict(e.key.items).get("n")): e for e in mf.read(path)}
    assert set(entries) == {("kernels_serving:chunk_cumsum", None), ("kernels_engine:clamp", 40),
                            ("kernels_engine:clamp", 20)}
    inf_entry, nan_entry = entries[("kernels_engine:clamp", 40)], entries[("kernels_engine:clamp", 20)]
    assert inf_entry.callspec is not None and inf_entry.callspec["args"][3] == {"kind": "float", "value": "-inf"}
    assert nan_entry.callspec is not None and nan_entry.callspec["kwargs"]["hi"] == {"kind": "float", "value": "nan"}
    _, args, kwargs = rebuild(inf_entry)
    assert args[3] == float("-inf") and kwargs["hi"] == float("inf")
    _, args, kwargs = rebuild(nan_entry)
    assert args[3] == -1.0 and math.isnan(kwargs["hi"])

    # a tag an old or hostile writer got wrong is that entry's problem only, refused with the reason
    bad = json.loads(next(t for t in path.read_text().splitlines() if '"-inf"' in t))
    bad["key"] = [["n", 41] if k == "n" else [k, v] for k, v in bad["key"]]
    bad["callspec"]["args"][3]["value"] = "-Infinity"
    mf.append(path, [json.dumps(bad) + "\n"])
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'fresh.db'}")  # replay tunes from scratch
    report = tunevault.warmup(path)
    status = {dict(i.key.items).get("n"): (i.status, i.reason) for i in report.items}
    assert status[40] == status[20] == status[None] == ("tuned", "")
    assert status[41][0] == "skipped" and "argspec invalid" in status[41][1], status[41]
    assert "kind float must be one of" in status[41][1]


def test_a_record_that_cannot_be_written_costs_only_its_callspec(tv, tmp_path: Path) -> None:
    """Whatever a captured call holds that JSON cannot (here: a raw NaN, as ArgSpecs once kept it),
    the other keys' lines are written, the key's own line says why it has no callspec, and nothing
    raises out of the block."""
    import kernels_engine as ke

    path = tmp_path / "keys.jsonl"
    x = torch.randn(40)
    with tunevault.capture(path, flush_interval=0) as rec:
        serve([10])
        ke.run_clamp(x, -1.0, 1.0)
        (clamped,) = [r for (kernel, _), r in rec._records.items() if kernel == "kernels_engine:clamp"]
        clamped.callspec = {"args": [{"kind": "scalar", "value": float("nan")}], "kwargs": {}, "grids": []}
    by_kernel = {e.kernel: e for e in mf.read(path)}
    assert by_kernel["kernels_serving:chunk_cumsum"].callspec is not None
    bad = by_kernel["kernels_engine:clamp"]
    assert bad.count == 1 and bad.callspec is None
    assert bad.callspec_error is not None and "cannot be written" in bad.callspec_error


def test_capture_without_install_warns(tmp_path: Path, caplog) -> None:
    with tunevault.capture(tmp_path / "k.jsonl"):
        pass
    assert "not installed" in caplog.text
    with pytest.raises(FileNotFoundError):
        mf.read(tmp_path / "k.jsonl")  # nothing was seen, nothing written


def test_a_write_cut_short_leaves_no_torn_line(tmp_path: Path) -> None:
    """A flush that fails part way (here the file size limit: EFBIG after a short write, as a full
    disk gives ENOSPC) leaves the manifest as it was, so the retry of the same lines reads cleanly."""
    path = tmp_path / "keys.jsonl"
    code = f"""
import json, os, resource, signal
from tunevault.capture import manifest as mf
from tunevault.core.model import TuningKey
path = {str(path)!r}
def lines(first, n):
    return [mf.line("m:k", TuningKey((("n", i),)), {{"hit": 1}}, 1.7e9, 1.7e9, 1, "h", {{"pad": "x" * 2000}},
                    sign_key="k") for i in range(first, first + n)]
mf.append(path, lines(0, 1))
before = os.path.getsize(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (before + 20_000, hard))
batch = lines(1, 40)
try:
    mf.append(path, batch)
    failed = None
except OSError as exc:
    failed = exc.errno
after_failure = os.path.getsize(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
mf.append(path, batch)  # the recorder keeps the lines and writes them again at its next flush
got = mf.read(path, key="k")
print(json.dumps([failed, before, after_failure, len(got), sum(e.counts["hit"] for e in got)]))
"""
    failed, before, after_failure, entries, hits = run_py(code, timeout=60)
    assert failed is not None, "the write was cut short"
    assert after_failure == before, "the partial bytes were truncated away"
    assert (entries, hits) == (41, 41)


def _warmup_items(path: Path, store: Path) -> list[WarmupItem]:
    """Warm ``path`` up into a fresh store (nothing decided yet)."""
    tunevault.install(mode="tune", store=f"sqlite:///{store}")
    return tunevault.warmup(path).items


def _warmup_fresh(path: Path, store: Path) -> dict[str, tuple[str, str]]:
    """Status and reason by key text, of a warmup into a fresh store."""
    return {i.key.text: (i.status, i.reason) for i in _warmup_items(path, store)}


def test_a_constexpr_larger_than_the_tensors_is_replayed(tv, tmp_path: Path) -> None:
    """A heuristic's block size (BLOCK_N=512 for one row of 300) is a compile-time value, not an
    index: the replay tunes the key without padding for it; a forged huge one is refused by Triton
    (no block that large), with nothing allocated for it."""
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        scale_rows(1, 300)
    (entry,) = mf.read(path)
    assert ("BLOCK_N", {"kind": "scalar", "value": 512}) in entry.callspec["kwargs"].items()
    assert [s for s, _ in _warmup_fresh(path, tmp_path / "a.db").values()] == ["tuned"]

    forged = json.loads(path.read_text().splitlines()[0])
    forged["callspec"]["kwargs"]["BLOCK_N"]["value"] = 1 << 40
    write = tmp_path / "forged.jsonl"
    write.write_text(json.dumps(forged) + "\n")
    ((status, reason),) = _warmup_fresh(write, tmp_path / "b.db").values()
    assert status == "failed" and "arange" in reason, reason


def test_integers_that_are_values_not_sizes_are_replayed(tv, tmp_path: Path, monkeypatch) -> None:
    """A collator's ``pad_id=151643`` is larger than its 512-element tensors and a sentinel
    constexpr is 2**31 - 1: the captured call ran with both, so warmup tunes the key (padding the
    tensors to pad_id, never to the constexpr) and a sealed server finds it. Where padding is over
    the byte cap, a signed manifest is replayed as captured and an unsigned one refused; so is the
    sentinel kept in the ``lens`` tensor, which an unsigned line could as well use as an index."""
    from tunevault.capture.argspec import CallSpec

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.pad_batch(rows=2)  # no row of length NO_ROW: lens holds [10, 256]
    (entry,) = mf.read(path)
    assert entry.callspec is not None
    # out, captured after the call, holds pad_id: as an index value it asks for pad_id + 1 elements
    assert CallSpec.from_json(entry.callspec).check(ks.pad_tokens) == 151644
    store = tmp_path / "warm.db"
    assert set(_warmup_fresh(path, store).values()) == {("tuned", "")}
    tunevault.uninstall()
    assert _sealed_serve(store, "ks.pad_batch(rows=2)") == {"hits": 1, "misses": 0}

    sentinel = tmp_path / "sentinel.jsonl"
    tunevault.install(mode="tune", store="memory://")
    with tunevault.capture(sentinel):
        ks.pad_batch()  # lens holds 2**31 - 1, unsigned
    ((status, reason),) = _warmup_fresh(sentinel, tmp_path / "s.db").values()
    assert status == "skipped" and "lens holding the index 2147483647" in reason and "signed" in reason, reason

    monkeypatch.setenv("TUNEVAULT_REPLAY_MAX_BYTES", "100000")  # the tensors fit, padded to pad_id not
    ((status, reason),) = _warmup_fresh(path, tmp_path / "a.db").values()
    assert status == "skipped" and "out holding the index 151643" in reason and "signed" in reason, reason
    signed = tmp_path / "signed.jsonl"
    tunevault.install(mode="tune", store="memory://", bundle_key="k")
    with tunevault.capture(signed):
        ks.pad_batch()
    tunevault.install(mode="tune", store=f"sqlite:///{tmp_path / 'b.db'}", bundle_key="k")
    assert [(i.status, i.reason) for i in tunevault.warmup(signed).items] == [("tuned", "")]


def test_values_that_do_not_fit_the_dtype_are_refused_not_wrapped(tv, tmp_path: Path) -> None:
    """``lens`` (int32) forged to hold 2**32 + 10: torch would rebuild it as 10, a call unlike the
    line's, so warmup skips the line naming the dtype; bool holds only 0 and 1, int8 -128 to 127."""
    from tunevault.capture.argspec import ArgSpec
    from tunevault.core.model import InvalidEntry

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.pad_batch(rows=2)
    forged = json.loads(path.read_text().splitlines()[0])
    forged["callspec"]["args"][1]["values"] = [(1 << 32) + 10, 256]
    write = tmp_path / "forged.jsonl"
    write.write_text(json.dumps(forged) + "\n")
    ((status, reason),) = _warmup_fresh(write, tmp_path / "f.db").values()
    assert status == "skipped" and "must fit int32 (-2147483648 to 2147483647); got 4294967306" in reason, reason
    layout = {"kind": "tensor", "shape": [2], "stride": [1], "device": "cpu"}
    for dtype, extra, got in (("bool", {"values": [7, 0]}, 7), ("int8", {"low": -129, "high": 3}, -129),
                              ("uint8", {"values": [-1, 3]}, -1)):
        with pytest.raises(InvalidEntry, match=f"must fit {dtype} .*; got {got}$"):
            ArgSpec.from_json(layout | {"dtype": dtype} | extra)
    assert ArgSpec.from_json(layout | {"dtype": "bool", "values": [1, 0]}).build("cpu").tolist() == [True, False]
    kept = ArgSpec.from_json(layout | {"dtype": "int8", "values": [-128, 127]})
    assert kept.build("cpu").tolist() == [-128, 127]


def test_a_refused_call_falls_back_to_another_captured_for_the_key(tv, tmp_path: Path, monkeypatch) -> None:
    """Two processes captured one key (a batch of 64 rows, then one row): where the first call is
    over the replay's byte cap, the second is replayed instead."""
    path = tmp_path / "keys.jsonl"
    for rows in (64, 1):
        with tunevault.capture(path):  # a recorder of its own, as another process has
            scale_rows(rows, 300)
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert [t["callspec"]["args"][0]["shape"] for t in lines] == [[64, 300], [1, 300]]
    assert len(mf.read(path)) == 1
    monkeypatch.setenv("TUNEVAULT_REPLAY_MAX_BYTES", "10000")  # 2 x 64 x 300 floats over it, one row within
    assert [s for s, _ in _warmup_fresh(path, tmp_path / "a.db").values()] == ["tuned"]
    monkeypatch.setenv("TUNEVAULT_REPLAY_MAX_BYTES", "1000")  # neither fits: the first refusal is the reason
    ((status, reason),) = _warmup_fresh(path, tmp_path / "b.db").values()
    assert status == "skipped" and "153600 bytes" in reason and "1 other captured call(s)" in reason, reason


def test_compile_ahead_compiles_the_captured_call_the_replay_tunes(tv, tmp_path: Path) -> None:
    """A key's first captured call passes the size check but rebuilds to another key (a line from
    elsewhere): the replay tunes the second call, and compile ahead must compile that one too
    (it took the first that passed the size check: the helpers' compiles were not the tuning's)."""
    import dataclasses

    from tunevault.capture.locate import import_autotuner
    from tunevault.capture.replay import rebuild, replayed_callspec

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        scale_rows(2, 300)
    (entry,) = mf.read(path)
    good = entry.callspec
    assert good is not None
    other = json.loads(json.dumps(good))
    other["args"][2]["value"] = 301  # N, the key: rebuilt, it is another key
    twice = dataclasses.replace(entry, callspec=other, alternates=[good])
    at, args, _kwargs = rebuild(twice)
    assert args[2] == 300, "the replay tunes the second call"
    assert replayed_callspec(at, twice) == good
    assert replayed_callspec(import_autotuner(entry.kernel), entry) == good


def test_kernels_bound_to_other_names_than_their_function_are_replayed(tv, tmp_path: Path) -> None:
    """``scale_tuned = triton.autotune(...)(_scale_by_two)``: the manifest names the attribute that
    holds the kernel, so warmup imports the Autotuner, and two autotuners over one function
    (``shift_small``, ``shift_large``) are two kernels, not one."""
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        for kernel in (ks.scale_tuned, ks.shift_small, ks.shift_large):
            ks.run_blocks(kernel, 100)
    assert [e.kernel for e in mf.read(path)] == [
        "kernels_serving:scale_tuned", "kernels_serving:shift_small", "kernels_serving:shift_large"]
    assert set(_warmup_fresh(path, tmp_path / "a.db").values()) == {("tuned", "")}
    assert tunevault.check(path).ok


def test_a_manifest_naming_the_jit_function_replays_the_kernel_over_it(tv, tmp_path: Path) -> None:
    """Lines captured before aliases were recorded name the @triton.jit function: the one autotuned
    kernel over it is replayed; of two that differ, neither is guessed."""
    from tunevault.capture.locate import KernelNotFound, import_autotuner
    from tunevault.core.identity import kernel_id
    from tunevault.engine import worker

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.run_blocks(ks.scale_tuned, 100)
        ks.run_blocks(ks.shift_small, 100)
    old = tmp_path / "old.jsonl"  # and without the kernel's digest, as lines were written then
    old_lines = [{k: v for k, v in json.loads(text).items() if k != "digest"} for text in path.read_text().splitlines()]
    old.write_text("".join(json.dumps(doc) + "\n" for doc in old_lines)
                   .replace("kernels_serving:scale_tuned", "kernels_serving:_scale_by_two")
                   .replace("kernels_serving:shift_small", "kernels_serving:_shift_by_one"))
    status = {i.kernel.partition(":")[2]: (i.status, i.reason) for i in _warmup_items(old, tmp_path / "a.db")}
    assert status["_scale_by_two"] == ("tuned", "")
    shift_status, reason = status["_shift_by_one"]
    assert shift_status == "skipped" and "several autotuned kernels that differ" in reason, reason
    assert "kernels_serving:shift_small, kernels_serving:shift_large" in reason

    assert import_autotuner("kernels_serving:_scale_by_two") is ks.scale_tuned
    with pytest.raises(KernelNotFound, match="several"):
        import_autotuner("kernels_serving:_shift_by_one")
    # the tuning worker is told the digest, which tells them apart
    digest = kernel_id(ks.shift_large).digest
    assert worker.import_autotuner("kernels_serving:_shift_by_one", digest) is ks.shift_large


def test_a_grid_reading_a_heuristic_under_the_autotuner_is_captured(tv, tmp_path: Path) -> None:
    """@triton.autotune above @triton.heuristics: the grid of each config is evaluated with the
    heuristics' values, as Triton launches it, so the key gets an argspec and warmup tunes it."""
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.run_span(300)  # ROWS=4: SPAN = 128 and 256
        ks.run_span(50)  # ROWS=2: SPAN = 64 and 128
    entries = {dict(e.key.items)["n"]: e for e in mf.read(path)}
    assert {n: (e.callspec_error, e.callspec and e.callspec["grids"]) for n, e in entries.items()} == {
        300: (None, [[3, 1, 1], [2, 1, 1]]), 50: (None, [[1, 1, 1], [1, 1, 1]])}
    assert set(_warmup_fresh(path, tmp_path / "a.db").values()) == {("tuned", "")}


def test_a_grid_reading_a_parameter_left_to_its_default_is_captured(tv, tmp_path: Path) -> None:
    """Triton binds defaults before it calls the grid; capture evaluated the grid without them
    (KeyError: 'REP'), so the key had no argspec: no warmup, and isolated tuning ran in process."""
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.run_rep(300)
    (entry,) = mf.read(path)
    assert entry.callspec_error is None and entry.callspec is not None
    assert entry.callspec["grids"] == [[5, 1, 1], [3, 1, 1]]  # 300 / (32 * 2), 300 / (64 * 2)
    assert set(_warmup_fresh(path, tmp_path / "a.db").values()) == {("tuned", "")}


def test_tensors_passed_by_keyword_in_another_order_are_one_key(tv, sqlite_url: str, tmp_path: Path) -> None:
    """Two call sites passing the same tensors by keyword in another order meet one key, as in
    stock Triton. The key listed the dtypes in call order: capture saw one order, and a sealed
    server then missed the other (explained as "this very key names no config")."""
    import kernels_core as kc

    manifest, x, out = tmp_path / "keys.jsonl", kc.vec(40), torch.empty(40)
    with tv.capture(manifest):
        kc.add_one[kc.grid(40)](x_ptr=x, out_ptr=out, n=40)
        kc.add_one[kc.grid(40)](out_ptr=out, x_ptr=x, n=40)
    (entry,) = mf.read(manifest)
    assert entry.count == 2 and entry.counts["tuned"] == 1 and entry.counts["hit"] == 1
    tv.uninstall()
    tv.install(mode="tune", store=sqlite_url)  # a fresh server on the warm store, sealed
    tv.seal(on_miss="error")
    kc.add_one[kc.grid(40)](out_ptr=out, x_ptr=x, n=40)
    kc.add_one[kc.grid(40)](x_ptr=x, out_ptr=out, n=40)
    assert torch.equal(out, x + 1)


def test_a_key_pruning_leaves_one_config_is_counted_and_left_out_of_capture(tv, sqlite_url: str,
                                                                           tmp_path: Path) -> None:
    """Pruning to one config launches it untimed (stock's rule, for this process only: the prune
    function may read arguments outside the key, so the choice is not stored). Such a key was not
    counted on its first call, and captured from its second: a warmup then reported it failed ("no
    decision stored") and a preflight reported it missing. It is counted, left out of capture, and
    a warmup that meets it says there is nothing to tune."""
    import kernels_shard as shard
    from tunevault.policy.stock import single_pruned_skips_benchmark

    manifest, x = tmp_path / "keys.jsonl", torch.ones(120)
    out = torch.empty_like(x)
    with tv.capture(manifest):
        for _ in range(3):
            shard.pruned_to_one[lambda m: (triton.cdiv(120, m["BLOCK"]),)](x, out, 120)
    assert torch.equal(out, x * 2)
    if not single_pruned_skips_benchmark():  # Triton up to 3.4 benchmarks the one config: a tuning
        assert [e.counts["tuned"] for e in mf.read(manifest)] == [1]
        return
    assert not manifest.exists() or mf.read(manifest) == []
    counts = tv.stats()["kernels"]["kernels_shard:pruned_to_one"]["warmup"]
    assert counts["hits"] == 3 and counts["tunings"] == 0 and counts["benchmark_runs"] == 0
    assert list(SqliteStore(sqlite_url.removeprefix("sqlite:///")).decisions()) == [], "a rule is not stored"
    shard.write_manifest(manifest, [120], kernel=shard.pruned_to_one)  # as an older tunevault captured it
    replayed = tv.warmup(str(manifest))
    assert replayed.ok and [i.status for i in replayed.items] == ["decided"], replayed.to_json()


def test_a_kernel_a_factory_built_is_not_importable_not_another_autotuner(tv, tmp_path: Path) -> None:
    """A per-dtype variant a factory keeps in a dict has no module attribute: its line names the
    @triton.jit function. Warmup tuned ``triple_default`` over the same function instead and check
    said decided, while serving missed. The line carries the kernel's digest: no autotuner in the
    module has it, so the key is not importable (built at run time), checked NOT decided; a line
    without a digest (an older manifest) still takes the one kernel over the function."""
    import subprocess
    import sys

    from conftest import subprocess_env
    from tunevault.core.identity import kernel_id

    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.run_blocks(ks.triple_variant(torch.float32), 100)
    (entry,) = mf.read(path)
    assert entry.kernel == "kernels_serving:_triple"
    assert entry.digest == kernel_id(ks.triple_variant(torch.float32)).digest != kernel_id(ks.triple_default).digest
    store = tmp_path / "warm.db"

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "tunevault.cli.main", "--store", f"sqlite:///{store}", *args],
                              capture_output=True, text=True, timeout=180, env=subprocess_env())
        return proc.stdout

    (item,) = json.loads((out := cli("warmup", str(path), "--json"))[out.index("{"):])["items"]
    assert item["status"] == "skipped" and "built at run time" in item["reason"], item
    assert "0/1 keys decided" in cli("check", str(path))
    assert not store.exists() or not SqliteStore(str(store)).listing()  # triple_default was not tuned

    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "digest"}) + "\n")
    (item,) = json.loads((out := cli("warmup", str(old), "--json"))[out.index("{"):])["items"]
    assert item["status"] == "tuned", item  # today's behaviour for old manifests: the one kernel over it


def test_a_lines_kernel_digest_is_signed(tv, tmp_path: Path) -> None:
    """The digest picks the kernel replayed: a signed manifest whose digest was altered is refused."""
    path = tmp_path / "keys.jsonl"
    line = mf.line("kernels_serving:_triple", mf.TuningKey.from_json([["n", 100]]), {"hit": 1}, 1e9, 1e9, 1, "h",
                   sign_key="k" * 32, digest="ab" * 8)
    path.write_text(line)
    assert mf.read(path, key="k" * 32)[0].digest == "ab" * 8
    path.write_text(line.replace("ab" * 8, "cd" * 8))
    with pytest.raises(mf.ManifestError):
        mf.read(path, key="k" * 32)


def test_a_key_value_equal_but_of_another_type_is_captured_too(tv, tmp_path: Path) -> None:
    """``n=100.0`` after ``n=100`` (a size computed with ``/``), ``True`` after ``1``: the in-memory
    raw key holds them equal, so the later call was counted under the earlier key and never
    captured, while the labelled key (and Triton's compilation) tells them apart: serving missed."""
    x = torch.randn(100)
    out = torch.empty_like(x)
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        for n in (100, 200 / 2, 100):
            ks.scale_tuned[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, out, n)
    from tunevault.core.kernel_state import KernelState

    assert sorted(e.key.text for e in mf.read(path)) == sorted(
        KernelState(ks.scale_tuned).labelled_key({"x_ptr": x, "out_ptr": out, "n": n}).text for n in (100, 100.0))
    store = tmp_path / "warm.db"
    assert set(_warmup_fresh(path, store).values()) == {("tuned", "")}
    tunevault.uninstall()
    call = ("x = torch.randn(100); out = torch.empty_like(x)\n"
            "ks.scale_tuned[lambda meta: (-(-100 // meta['BLOCK']),)](x, out, 200 / 2)")
    assert _sealed_serve(store, call) == {"hits": 1, "misses": 0}


def test_a_busy_key_writes_log_many_count_lines(tv, tmp_path: Path) -> None:
    """Every periodic flush wrote a count line per active key (~2.6 MB per key per day at 10 s):
    now a count-only line waits for the key's count to double, and the final flush writes the rest."""
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path, flush_interval=0) as rec:
        for _ in range(100):
            ks.run_blocks(ks.scale_tuned, 100)
            rec.flush(final=False)  # as the periodic flush does
    written = path.read_text().splitlines()
    assert len(written) <= 9, len(written)  # first line, counts 2, 4, ..., 64, the final flush
    (entry,) = mf.read(path)
    assert entry.count == 100


def _tail(path: Path, start: int) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        f.seek(start)
        return [json.loads(text) for text in f.read().splitlines()]


def test_near_the_size_cap_new_keys_are_written_and_count_lines_dropped(tv, tmp_path: Path, caplog) -> None:
    """A manifest filled by count lines refused every later append: a key met for the first time
    was silently lost and check said all decided. Near the cap count-only lines are dropped (one
    warning) and new keys still written; a new key refused at the hard cap is an error naming it."""
    path = tmp_path / "keys.jsonl"
    with path.open("wb") as f:  # a sparse file: sizes near 256 MiB without writing them
        f.truncate(mf.COUNT_LINES_UP_TO - 1)
    start = path.stat().st_size
    with caplog.at_level("WARNING", logger="tunevault"), tunevault.capture(path, flush_interval=0) as rec:
        ks.run_blocks(ks.scale_tuned, 100)
        assert rec.flush() == 1  # a new key: written
        ks.run_blocks(ks.scale_tuned, 100)
        ks.run_blocks(ks.scale_tuned, 200)
        assert rec.flush() == 1  # the new key (n=200); n=100's count-only line is dropped
    assert [(d["key"][0][1], "callspec" in d) for d in _tail(path, start)] == [(100, True), (200, True)]
    assert sum("count-only lines are dropped" in r.getMessage() for r in caplog.records) == 1

    with path.open("r+b") as f:
        f.truncate(mf.MAX_MANIFEST_BYTES - 100)
    caplog.clear()
    with caplog.at_level("WARNING", logger="tunevault"), tunevault.capture(path, flush_interval=0):
        ks.run_blocks(ks.scale_tuned, 300)
    assert path.stat().st_size == mf.MAX_MANIFEST_BYTES - 100
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "NOT recorded" in error.getMessage() and "kernels_serving:scale_tuned [n=300" in error.getMessage()


def test_fallback_calls_before_capture_began_are_counted_as_missed(tv, tmp_path: Path) -> None:
    """A key that fell back before the capture block began reaches capture through the in-memory
    hit hook: it was recorded as ``hit`` (a decision served), though no decision exists."""
    tv.seal("fallback")
    serve([10], dtype=torch.float32)  # the miss: served by the fallback config, remembered
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        for _ in range(3):
            serve([10], dtype=torch.float32)  # in-memory fallback hits
    (entry,) = mf.read(path)
    assert entry.counts == {"hit": 0, "tuned": 0, "missed": 3}


def test_a_manifest_from_before_the_kernels_configs_changed_says_so(tv, tmp_path: Path) -> None:
    """A library upgrade added a config: every key of the old manifest failed with "replayed launch
    uses a config with no captured grid", which names neither the cause nor the remedy (and a
    config inserted, not appended, took another config's grid)."""
    path = tmp_path / "keys.jsonl"
    with tunevault.capture(path):
        ks.run_blocks(ks.scale_tuned, 100)
    tv.uninstall()
    line = json.loads(path.read_text())
    assert len(line["callspec"]["grids"]) == len(ks.scale_tuned.configs) == 2
    line["callspec"]["grids"] = line["callspec"]["grids"][:1]  # captured when the kernel had one config less
    older = tmp_path / "older.jsonl"
    older.write_text(json.dumps(line) + "\n")
    (item,) = _warmup_items(older, tmp_path / "warm.db")
    assert item.status == "skipped" and "configs changed since the capture" in item.reason, item
