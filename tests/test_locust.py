"""The operators' locust scenario, run headless against the test gateway in each release
mode at once: it must exit 0 (its end-of-run invariants held), write its CSV and HTML
reports, and leave the stock exactly sold (claimed + remaining = capacity)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from release_service.devtools.seed import seed_users

LOCUST = Path(sys.executable).parent / "locust"
LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtest" / "locustfile.py"
USERS, STOCK = 80, 30


async def test_the_spike_scenario_in_every_mode(api, gateway_url, stack_settings, tmp_path):
    runs = {}
    for mode in ("first_come", "queue", "lottery"):
        users = tmp_path / f"{mode}.jsonl"
        await seed_users(stack_settings, USERS, users, progress=False)
        runs[mode] = await asyncio.create_subprocess_exec(
            str(LOCUST), "-f", str(LOCUSTFILE), "--host", gateway_url, "--headless",
            "--users", str(USERS), "--spawn-rate", str(USERS), "--run-time", "14s",
            "--users-file", str(users),
            "--create-release", str(STOCK), "--opens-in", "2", "--mode", mode,
            # The lottery is drawn when its window ends; the others stay open all run.
            "--window", "5" if mode == "lottery" else "60", "--cancel-share", "0",
            "--only-summary",
            "--csv", str(tmp_path / mode), "--html", str(tmp_path / f"{mode}.html"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            # Not an argument: a token starting with "-" would read as an option, and a
            # command line is visible to every user of the machine.
            env={**os.environ, "LOCUST_ADMIN_TOKEN": stack_settings.admin_token})
    outputs = {}
    for mode, process in runs.items():
        out, _ = await asyncio.wait_for(process.communicate(), 90)
        outputs[mode] = out.decode(errors="replace")
        assert process.returncode == 0, outputs[mode][-3000:]
        assert "INVARIANT BROKEN" not in outputs[mode]
        assert (tmp_path / f"{mode}_stats.csv").exists()
        assert (tmp_path / f"{mode}.html").exists()

    # Each run names its release in its end-of-run report.
    ids = {mode: re.search(rf"release (\S+) \({mode}\): capacity {STOCK}", out).group(1)
           for mode, out in outputs.items()}
    for mode in ("first_come", "queue"):
        view = await api.admin_release(ids[mode])
        # More residents than stock, all in the window: every slot claimed exactly once.
        assert (view["claimed"], view["remaining"]) == (STOCK, 0), outputs[mode][-3000:]
    for _ in range(60):  # the gateway draws when the entry window ends
        result = (await api.call("GET", f"/v1/releases/{ids['lottery']}/lottery"))[2]
        if result["state"] == "drawn":
            break
        await asyncio.sleep(0.5)
    assert result["state"] == "drawn" and result["entries"] > STOCK, result
    assert len(result["winners"]) + len(result["skipped"]) == STOCK
    assert (await api.admin_release(ids["lottery"]))["claimed"] == len(result["winners"])
