"""Take ``docs/flower.png``: Flower's Tasks page during a real distributed sweep.

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432,
``/usr/bin/chromium``)::

    .venv/bin/python bench/flower_screenshot.py                 # writes docs/flower.png
    .venv/bin/python bench/flower_screenshot.py --out /tmp/x.png

What it does, all on 127.0.0.1 and all removed afterwards:

1. creates a throwaway PostgreSQL database and migrates it;
2. starts ``studyq flower --port <free port> --broker redis://127.0.0.1:6379/<db>`` with
   ``FLOWER_TASKS_COLUMNS`` (Flower's own setting, read from the environment) adding the
   ``args`` column, where a run's readable name (``study=… cond=… agent=… problem=… rep=…``)
   is shown: Flower 2.2's default columns (name, uuid, state, received, runtime, worker)
   show it only on a task's own page, and the column is cut at 400 px, which is why the
   study id and the condition labels (``terse | cold``: levels with a ``role``) are short;
3. starts ``studyq worker -P prefork -c 4`` on a queue of its own;
4. ``studyq submit``s a 320-run study of the ``sleep`` demo agent (20 personas x 2 prompts
   x 2 temperatures x 4 replicates, ``sleep_s`` 0.4 s; the personas carry no ``role``, so
   the condition label is prompt | temperature, and it changes every 4 runs), so the sweep
   takes about 30 s;
5. once runs are succeeding, screenshots ``http://127.0.0.1:<port>/tasks`` with headless
   Chromium (1400x900), then waits for the sweep to finish (``studyq wait``) and stops
   Flower and the worker (by PID), drops the database and deletes its Redis keys.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{HOST}:5432/postgres"
CHROMIUM = "/usr/bin/chromium"
TASKS_COLUMNS = "name,state,args,received,runtime,worker"

STUDY = """\
study_id: {study_id}
title: Prompt framing x temperature over 20 personas (Flower screenshot)
factors:
  - name: persona
    levels:
      - {{name: p01, value: 1}}
      - {{name: p02, value: 2}}
      - {{name: p03, value: 3}}
      - {{name: p04, value: 4}}
      - {{name: p05, value: 5}}
      - {{name: p06, value: 6}}
      - {{name: p07, value: 7}}
      - {{name: p08, value: 8}}
      - {{name: p09, value: 9}}
      - {{name: p10, value: 10}}
      - {{name: p11, value: 11}}
      - {{name: p12, value: 12}}
      - {{name: p13, value: 13}}
      - {{name: p14, value: 14}}
      - {{name: p15, value: 15}}
      - {{name: p16, value: 16}}
      - {{name: p17, value: 17}}
      - {{name: p18, value: 18}}
      - {{name: p19, value: 19}}
      - {{name: p20, value: 20}}
  - name: prompt
    levels:
      - {{name: terse, value: terse, metadata: {{role: baseline}}}}
      - {{name: verbose, value: verbose, metadata: {{role: treatment}}}}
  - name: temperature
    levels:
      - {{name: cold, value: 0.2, metadata: {{role: baseline}}}}
      - {{name: hot, value: 0.8, metadata: {{role: treatment}}}}
  - name: sleep_s
    levels:
      - {{name: s, value: 0.4}}
agent_specs: [sleep]
problem_ids: [noop]
design_spec:
  kind: full_factorial
run_budget:
  replicates: 4
seed_policy:
  base_seed: 7
execution:
  queue: {queue}
  timeout_s: 30
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def count_success(db_url: str, study_id: str) -> int:
    from orchestrator.store import ResultStore

    with ResultStore.open(db_url) as store:
        return store.count_by_status(study_id).get("success", 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "flower.png"))
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument(
        "--after", type=int, default=60, help="take the screenshot once this many runs succeeded"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    import redis
    from sqlalchemy import create_engine, text

    from orchestrator.store import upgrade

    out = Path(args.out).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="studyq-flower-"))
    db_name = f"studyq_flower_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    db_url = f"postgresql+psycopg://postgres@{HOST}:5432/{db_name}"
    broker = f"redis://{HOST}:6379/{args.redis_db}"
    queue = f"studyq-flower-{uuid.uuid4().hex[:8]}"
    study_id = "framing"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDYQ_")}
    env.update(STUDYQ_BROKER_URL=broker, STUDYQ_DATABASE_URL=db_url, PYTHONUNBUFFERED="1")
    studyq = [sys.executable, "-m", "orchestrator.cli"]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{db_name}"'))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upgrade(db_url)

        def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
            log = (tmp / f"{name}.log").open("wb")
            process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            processes.append(process)
            return process

        env["FLOWER_TASKS_COLUMNS"] = TASKS_COLUMNS
        start("flower", [*studyq, "flower", "--port", str(port), "--broker", broker])
        del env["FLOWER_TASKS_COLUMNS"]
        start(
            "worker",
            [*studyq, "worker", "--pool", "prefork", "--concurrency", "4", "--queues", queue],
        )
        wait_http(f"http://{HOST}:{port}/tasks", timeout=60)
        deadline = time.monotonic() + 60
        while "ready." not in (tmp / "worker.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError((tmp / "worker.log").read_text(errors="replace"))
            time.sleep(0.2)
        time.sleep(2)  # let Flower see the worker's first heartbeat
        study = tmp / "study.yaml"
        study.write_text(STUDY.format(study_id=study_id, queue=queue), encoding="utf-8")
        subprocess.run(
            [*studyq, "submit", str(study), "--no-progress"], cwd=REPO_ROOT, env=env, check=True
        )
        while count_success(db_url, study_id) < args.after:
            time.sleep(0.3)
        shot = tmp / "flower.png"
        subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp / 'chromium'}",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--virtual-time-budget=4000",
                f"--screenshot={shot}",
                f"http://{HOST}:{port}/tasks",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
        done = count_success(db_url, study_id)
        subprocess.run(
            [*studyq, "wait", study_id, "--no-progress", "--timeout", "300"],
            cwd=REPO_ROOT,
            env=env,
            check=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out)
        print(
            f"{out}: Flower tasks page with {done} of 320 runs succeeded at the moment of the "
            f"screenshot (Flower on port {port}, queue {queue})"
        )
    finally:
        for process in reversed(processes):
            stop(process)
        client = redis.Redis(host=HOST, port=6379, db=args.redis_db)
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        # the event exchange's binding tables, left in this dedicated database by the run
        client.delete("_kombu.binding.celeryev", "_kombu.binding_deadlines")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
