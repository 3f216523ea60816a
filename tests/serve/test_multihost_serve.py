"""`lov-jax serve` on a 2-process CPU cluster (jax.distributed over gloo, 4 devices each):
one model sharded over both processes, process 0 serving HTTP, process 1 replaying its
batches (lov_jax/serve/multihost.py). Concurrent requests equal single-process greedy
`generate`; SIGINT to process 0 closes process 1 too.

The processes get the environment `launch/local_cluster.sh` gives its processes; they
are started here directly so that process 0 can be interrupted.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai

from lov_jax.inference import Prompter, generate
from lov_jax.pretrained import load_pretrained
from lov_jax.testing.hf_checkpoints import make_tiny_hf

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["Describe a red square.", "Hi", "Count to ten, please."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pod_serves_the_same_tokens(tmp_path):
    ckpt = make_tiny_hf(tmp_path / "ckpt", tie_word_embeddings=False, seed=4)
    port, coordinator = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "lov_jax.cli", "serve", "--ckpt", str(ckpt), "--port",
           str(port), "--context", "128", "--length-buckets", "64", "--warmup-crops", "",
           "--slots", "8", "--mesh", "fsdp=-1", "--model-name", "pod"]  # fmt: skip
    procs, logs = [], []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "LOV_JAX_COORDINATOR": f"127.0.0.1:{coordinator}", "LOV_JAX_NUM_PROCESSES": "2",
               "LOV_JAX_PROCESS_ID": str(i), "PYTHONPATH": str(REPO)}  # fmt: skip
        logs.append(open(tmp_path / f"process_{i}.log", "w"))  # noqa: SIM115 - closed below
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logs[i],
                                      stderr=subprocess.STDOUT))  # fmt: skip
    cfg, params = load_pretrained(ckpt)
    prompter = Prompter.from_checkpoint(ckpt)
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = [generate(params, cfg, m, prompter=prompter, max_new_tokens=9) for m in msgs]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY",
                               max_retries=0, timeout=300)  # fmt: skip
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                for i, p in enumerate(procs):
                    assert p.poll() is None, (tmp_path / f"process_{i}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the pod did not come up"
                time.sleep(1)

        def ask(m):
            out = client.chat.completions.create(model="pod", messages=m, max_tokens=9)
            return out.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(len(msgs)) as pool:
            assert list(pool.map(ask, msgs)) == expected
        procs[0].send_signal(signal.SIGINT)  # process 0 closes, process 1 follows
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
