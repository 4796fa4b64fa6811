"""bench/peers.py's own arithmetic and server handling (the bench itself runs real servers for
many minutes and is never part of the tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _peers():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_performed_arithmetic_counts_linears_head_and_attention():
    peers = _peers()
    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32,
                             num_hidden_layers=3, intermediate_size=48, vocab_size=100)
    # a layer: q and o 32×32 each, k and v 32×16 each, the MLP 3 × 32×48
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48
    row = {"ids": 10, "head_rows": 4, "attended": 55}
    expected = 2 * 3 * per_layer * 10 + 2 * 32 * 100 * 4 + 4 * 3 * 4 * 8 * 55
    assert abs(peers.performed_gflop(config, row) - expected / 1e9) < 1e-12


def test_matmul_peak_is_a_rate():
    import torch

    assert _peers().matmul_peak(seconds=0.2, n=256) > 0.1
    assert _peers().matmul_peak(seconds=0.2, n=256, dtype=torch.bfloat16) > 0.1     # (emulated without bf16 units)


def test_a_server_is_started_waited_for_and_measured(tmp_path):
    peers = _peers()
    port = peers.free_port()
    script = tmp_path / "server.py"
    script.write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    proc = peers.start_server([sys.executable, str(script), str(port)], port, tmp_path / "log", wait_s=60)
    try:
        assert peers.peak_rss_of(proc.pid) > 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    failing = tmp_path / "fail.py"
    failing.write_text("import sys; print('no model here'); sys.exit(3)\n")
    try:
        peers.start_server([sys.executable, str(failing)], port, tmp_path / "log2", wait_s=60)
    except RuntimeError as exc:
        assert "no model here" in str(exc)
    else:
        raise AssertionError("a server that exits must be reported")
