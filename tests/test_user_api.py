"""`loom.launch.run` / `report`: the user's own loop on loom's Ray workers.

Ray starts twice here: the README's example file as a script (its own local
instance), and one local instance shared by the in-process runs (which also
covers `run` inside an initialised Ray)."""
import io
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import loom.launch
from loom.launch import api, cluster
from loom.launch.config import ConfigError, parse_env
from loom.launch.recorder import ProgressBar, format_summary
from loom.launch.worker import takes_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "user_loop.py")


# ------------------------------------------------------------ without Ray

def test_report_and_device_outside_run_raise():
    with pytest.raises(RuntimeError, match=r"report\(\) works inside a train_fn that loom.launch.run runs"):
        loom.launch.report({"loss": 1.0})
    with pytest.raises(RuntimeError, match="device"):
        loom.launch.device()


def test_report_rows_steps_and_values():
    rows, steps = [], []

    class Rec:
        def step(self, row):
            rows.append(row)

    with api.rank_session(Rec(), steps.append):
        loom.launch.report({"loss": torch.tensor(2.5, dtype=torch.float64), "lr": 0.1})
        loom.launch.report({"loss": 1.5, "step": 10})
        loom.launch.report({"tag": "x"})
        with pytest.raises(TypeError, match="metric 'w' is a Tensor"):
            loom.launch.report({"w": torch.ones(3)})
        with pytest.raises(TypeError, match="metrics must be a dict"):
            loom.launch.report([1.0])
        with pytest.raises(ValueError, match="report: step=-3 must be >= 0"):
            loom.launch.report({"loss": 1.0, "step": -3})
    assert rows == [{"step": 0, "loss": 2.5, "lr": 0.1}, {"step": 10, "loss": 1.5}, {"step": 11, "tag": "x"}]
    assert steps == [0, 1, 11, 12]  # fault injection's step hook: at the start and after each report
    with api.rank_session(None, steps.append):  # other ranks: nothing is sent, steps still advance
        loom.launch.report({"loss": 1.0})
    assert len(rows) == 3 and steps[-2:] == [0, 1]


def test_train_fn_signatures():
    assert takes_config(lambda config: 0) and takes_config(lambda c, extra=1: 0) and takes_config(lambda *a: 0)
    assert not takes_config(lambda: 0)
    with pytest.raises(TypeError, match=r"also needs \['b'\]; it must take one argument \(config\) or none"):
        takes_config(lambda a, b: 0)


def test_run_rejects_bad_arguments_before_starting(tmp_path):
    with pytest.raises(ConfigError, match=r"option 'lr' is a setting of loom's own training loop \(\[train\]\)"):
        loom.launch.run(lambda: 0, options={"lr": 0.1}, runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown option 'hang_flor_s'; did you mean 'hang_floor_s'"):
        loom.launch.run(lambda: 0, options={"hang_flor_s": 1}, runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--inject: .*rank 5 is outside 0..1"):
        loom.launch.run(lambda: 0, options={"inject": "hang:rank=5,step=1"}, runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="workers=0 must be an int >= 1"):
        loom.launch.run(lambda: 0, workers=0, runs_dir=str(tmp_path))
    with pytest.raises(TypeError, match="train_fn must be callable"):
        loom.launch.run("train", runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--env: LOOM_SURELY_UNSET is not set in this environment"):
        loom.launch.run(lambda: 0, env=["LOOM_SURELY_UNSET"], runs_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"config must be picklable .*TypeError: cannot pickle '_thread.lock'"):
        loom.launch.run(lambda: 0, config={"lock": threading.Lock()}, runs_dir=str(tmp_path))
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"train_fn must be picklable"):
        loom.launch.run(lambda: lock.acquire(), runs_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing started, no run directory
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create the run directory"):
        loom.launch.run(lambda: 0, runs_dir=str(blocker / "runs"))


def test_sys_exit_in_train_fn_is_a_named_failure(monkeypatch):
    from loom.launch.worker import call_train_fn
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"train_fn called sys.exit\(3\) on rank 1"):
        call_train_fn(lambda config: sys.exit(3), None)
    assert call_train_fn(lambda: 5, None) == 5


def test_parse_env():
    environ = {"AWS_SECRET_ACCESS_KEY": "abc/+", "HOME": "/h"}
    assert parse_env(" AWS_SECRET_ACCESS_KEY, AWS_REGION=eu-west-1,X=a=b ", environ=environ) == {
        "AWS_SECRET_ACCESS_KEY": "abc/+", "AWS_REGION": "eu-west-1", "X": "a=b"}
    with pytest.raises(ConfigError, match="--env: '1X=2' must be KEY or KEY=VALUE"):
        parse_env("1X=2")
    assert parse_env("UNSET_HERE", resolve=False) == {"UNSET_HERE": ""}


def test_progress_and_summary_without_a_known_length():
    out = io.StringIO()
    bar = ProgressBar(None, stream=out)
    for step in range(12):
        bar.update(step, "loss 1.0")
    assert out.getvalue().splitlines() == ["step 1 loss 1.0", "step 10 loss 1.0"]
    table = format_summary({"steps": 3, "wall_time_s": 1.25, "extra": {"workers": 2}})
    assert "steps" in table and "1.2 s" in table and "workers" in table and "loss" not in table


# ------------------------------------------------------------ through Ray

@pytest.mark.timeout(240)
def test_readme_example_runs_as_a_script(tmp_path):
    proc = subprocess.run([sys.executable, EXAMPLE], cwd=tmp_path, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 returned weights of shape (1, 8)" in proc.stdout
    run = tmp_path / "runs" / "user-loop"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30)) and rows[-1]["loss"] < 0.01 * rows[0]["loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_loss"] == rows[-1]["loss"]
    assert json.loads((run / "config.json").read_text())["config"] == {"lr": 0.1, "steps": 30, "seed": 0}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the in-process runs, started in the repo
    root so that the workers import `examples.user_loop` as the driver does."""
    import ray
    here = os.getcwd()
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield ray
    finally:
        ray.shutdown()
        sys.path.remove(ROOT)
        os.chdir(here)


def _reference_weights(config):
    """The example's loop in one process on the whole batch (float64)."""
    from examples.user_loop import make_data
    x, y = make_data(seed=config["seed"])
    torch.manual_seed(config["seed"])
    model = torch.nn.Linear(x.shape[1], 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    losses = []
    for _ in range(config["steps"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.weight.detach(), losses


@pytest.mark.timeout(240)
def test_run_equals_one_process_and_keeps_the_contract(local_ray, tmp_path, monkeypatch):
    from examples import user_loop
    monkeypatch.setenv("LOOM_TEST_COPIED", "from-the-driver")

    def probe(config):  # a local function travels by value; it calls the example's loop
        import torch.distributed as dist
        contract = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                "MASTER_ADDR", "MASTER_PORT")}
        env = {k: os.environ.get(k) for k in ("LOOM_TEST_COPIED", "LOOM_TEST_GIVEN")}
        weights = user_loop.train_fn(config)
        return {"contract": contract, "env": env, "backend": dist.get_backend(), "device": str(loom.launch.device()),
                "weights": weights}

    config = {"lr": 0.1, "steps": 12, "seed": 3}
    result = loom.launch.run(probe, config, workers=2, env={"LOOM_TEST_GIVEN": "s3cr3t"}, device="cpu",
                             runs_dir=str(tmp_path), name="probe", steps=12, progress=False)
    result_env = loom.launch.run(lambda: os.environ["LOOM_TEST_COPIED"], workers=1, env=["LOOM_TEST_COPIED"],
                                 runs_dir=str(tmp_path), progress=False)
    assert result_env.returns == ["from-the-driver"] and result_env.metrics == {}
    ref, ref_losses = _reference_weights(config)
    assert len(result.returns) == 2
    for rank, out in enumerate(result.returns):
        assert torch.allclose(out["weights"], ref, rtol=0, atol=1e-10), (rank, out["weights"] - ref)
        c = out["contract"]
        assert (c["RANK"], c["LOCAL_RANK"], c["WORLD_SIZE"], c["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank), "2", "2")
        assert c["MASTER_PORT"] == result.returns[0]["contract"]["MASTER_PORT"]
        # the workers started before the driver set LOOM_TEST_COPIED: only what env= names reaches them
        assert out["env"] == {"LOOM_TEST_COPIED": None, "LOOM_TEST_GIVEN": "s3cr3t"}
        assert (out["backend"], out["device"]) == ("gloo", "cpu")
    assert result.value is result.returns[0]
    # rank 0's rows only, one per step; the loss is the mean over the ranks' halves = the whole batch's
    assert [r["step"] for r in result.metrics_history] == list(range(12))
    assert [r["loss"] for r in result.metrics_history] == pytest.approx(ref_losses, rel=1e-12)
    assert result.metrics == result.metrics_history[-1]
    run = tmp_path / "probe"
    assert result.run_dir == str(run)
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == result.metrics_history
    written = (run / "config.json").read_text()
    assert "s3cr3t" not in written and json.loads(written)["launch"]["job"]["env"] == ["LOOM_TEST_GIVEN"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    assert (run / "waits.jsonl").exists()  # the fault monitor watched the loop's collectives


@pytest.mark.timeout(240)
def test_a_failing_or_hanging_rank_is_named(local_ray, tmp_path):
    from loom import comms

    def _fails_on_rank_1(config):  # local functions travel by value
        for step in range(5):
            loom.launch.report({"loss": 1.0})
            if step == 2 and int(os.environ["RANK"]) == 1:
                raise ValueError(f"bad batch at step {step}")
            comms.all_reduce(torch.ones(1), op="sum")

    def _hangs_on_rank_1(config):
        for _ in range(40):
            comms.all_reduce(torch.ones(1), op="sum")
            loom.launch.report({"loss": 1.0})

    with pytest.raises(loom.launch.LaunchError, match=r"rank 1 failed: ValueError: bad batch at step 2") as err:
        loom.launch.run(_fails_on_rank_1, workers=2, runs_dir=str(tmp_path), progress=False,
                        options={"pg_timeout": 30})
    assert err.value.rank == 1 and isinstance(err.value.__cause__, ValueError)
    with pytest.raises(loom.launch.LaunchError, match=r"stopped all 2 workers after a hang: .*rank 1") as err:
        loom.launch.run(_hangs_on_rank_1, workers=2, runs_dir=str(tmp_path), progress=False,
                        options={"inject": "hang:rank=1,step=8", "hang_floor_s": 1.0, "pg_timeout": 60})
    assert err.value.rank == 1


def test_loom_ships_itself_whole(tmp_path):
    root = cluster._loom_tree(str(tmp_path))
    for sub in ("comms", "parallel", "checkpoint", "faults", "launch"):
        assert os.path.exists(os.path.join(root, sub, "__init__.py")), sub
    assert os.path.exists(os.path.join(root, "launch", "api.py"))
    assert not any("__pycache__" in d for d, _, _ in os.walk(root))


def test_readme_shows_the_example_file():
    """The README's block is examples/user_loop.py (less its docstring), which the test above runs."""
    import ast
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    section = readme[readme.index("## Your own training loop (`loom.launch.run`)"):]
    block = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
    with open(EXAMPLE) as fh:
        source = fh.read()
    docstring_end = source.index('"""', 3) + 3
    assert block.strip() == source[docstring_end:].strip()
    ast.parse(block)


def test_a_return_value_that_cannot_reach_the_driver_is_named():
    import threading

    from loom.launch.worker import call_train_fn
    with pytest.raises(TypeError, match="train_fn returned a lock that cannot be sent to the driver"):
        call_train_fn(lambda: threading.Lock(), None)
    assert call_train_fn(lambda cfg: {"loss": cfg}, 1.5) == {"loss": 1.5}
