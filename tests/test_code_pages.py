"""Device sessions give back onnxruntime's construction-time code pages and share one arena, and still run."""

import sys

import numpy as np
import pytest

from edge_ft.device import code_pages, ort_api
from edge_ft.device.engines.onnx_wire import one_node_model

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fd:01 10 /venv/onnxruntime/capi/onnxruntime_pybind11_state.so
Rss:                 200 kB
Anonymous:             0 kB
7f0000100000-7f0000900000 r-xp 00100000 fd:01 10 /venv/onnxruntime/capi/onnxruntime_pybind11_state.so
Size:               8192 kB
Rss:                6000 kB
Anonymous:             0 kB
7f0000900000-7f0000a00000 rw-p 00900000 fd:01 10 /venv/onnxruntime/capi/onnxruntime_pybind11_state.so
Rss:                  40 kB
Anonymous:            40 kB
7f0001000000-7f0001200000 r-xp 00000000 fd:01 11 /venv/numpy/_core/_multiarray_umath.so
Rss:                1500 kB
Anonymous:             0 kB
7f0002000000-7f0002001000 r-xp 00000000 fd:01 12 /venv/onnxruntime/capi/libonnxruntime_providers_shared.so
Rss:                   4 kB
Anonymous:             4 kB
7f0003000000-7f0003100000 r-xp 00000000 fd:01 13 /onnxruntime-env/site-packages/numpy/_core/_umath.so
Rss:                 800 kB
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
Anonymous:            12 kB
"""


def test_code_mappings_are_the_executable_read_only_mappings_of_onnxruntime_files(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    # only files under onnxruntime's own folder, not every path that happens to hold the word
    assert code_pages.code_mappings("/venv/onnxruntime/", smaps=str(smaps)) == [
        (0x7F0000100000, 0x7F0000900000, 6000, 0),  # the code; its data and read-only mappings are left alone
        (0x7F0002000000, 0x7F0002001000, 4, 4),  # a written page: listed, and release_code_pages skips it
    ]


@linux_only
def test_released_code_pages_leave_the_process_and_the_session_runs_the_same():
    session = ort_api.inference_session("relu", threads=1, model=one_node_model())
    x = np.array([-2.5], np.float32)
    assert session.run(None, {"x": x})[0].tolist() == [0.0]
    resident = sum(rss for _, _, rss, _ in code_pages.code_mappings())
    assert resident > 0  # running the session faulted its code in
    released = code_pages.release_code_pages()
    assert 0 < released <= resident
    assert sum(rss for _, _, rss, _ in code_pages.code_mappings()) < resident
    assert session.run(None, {"x": np.array([3.0], np.float32)})[0].tolist() == [3.0]  # faulted back from the file


@pytest.mark.parametrize("enabled", [True, False])
def test_inference_session_gives_code_pages_back_when_code_release_is_on(monkeypatch, enabled):
    calls: list[str] = []
    monkeypatch.setattr(ort_api, "release_code_pages", lambda: calls.append("release") or 0)
    monkeypatch.setitem(ort_api._memory, "environment_ready", False)
    monkeypatch.setitem(ort_api._memory, "shared_arena", False)  # the process's arena is registered once, elsewhere
    ort_api.set_memory_settings(release_code=enabled)
    try:
        session = ort_api.inference_session("relu", threads=1, model=one_node_model())
        session = ort_api.inference_session("relu", threads=1, model=one_node_model())
    finally:
        ort_api.set_memory_settings(release_code=True)
    assert session.run(None, {"x": np.array([1.5], np.float32)})[0].tolist() == [1.5]
    # on: once after the one-node environment session, then once after each session built
    assert calls == (["release"] * 3 if enabled else [])


def test_sessions_draw_on_the_shared_arena_only_when_the_arena_is_on():
    shared = ort_api.inference_session("relu", threads=1, model=one_node_model())
    assert shared.get_session_options().get_session_config_entry(ort_api.SHARED_ARENA) == "1"
    own = ort_api.inference_session("relu", threads=1, model=one_node_model(), mem_arena=False)  # --mem-arena off
    with pytest.raises(RuntimeError, match="does not have configuration"):
        own.get_session_options().get_session_config_entry(ort_api.SHARED_ARENA)
    assert own.run(None, {"x": np.array([-1.0], np.float32)})[0].tolist() == [0.0]
