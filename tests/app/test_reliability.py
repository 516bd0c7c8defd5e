"""`deploy build` as CI and impatient users run it: signals at several stages, SIGKILL, two
builds in one folder, a full disk, a read-only folder, a broken backend install, hostile user
code and a shape that cannot fit in memory. Each case must end with a documented exit code,
one line naming the problem, no traceback, no temp file left, and a report.json whose status
and artifact hashes match the files beside it (deploy.app.output_dir.report_problems).

Builds run as real subprocesses of the CLI, so signals and resource limits hit what a user's
shell would hit."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qat_deploy.deploy.app.output_dir import owned, report_problems
from qat_deploy.deploy.common import errors
from tests.report_schema import read_report

REPO = Path(__file__).resolve().parents[2]
#: --calibration minmax: auto (the default) is tested apart and would triple calibration here
BUILD = ["build", "--target", "onnxruntime", "--eval-samples", "200", "--calibration", "minmax"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start(args: list[str], **popen) -> subprocess.Popen:
    env = popen.pop("env", None) or _env()
    return subprocess.Popen(
        [sys.executable, "-m", "qat_deploy.deploy.app.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def deploy(args: list[str], **popen) -> subprocess.CompletedProcess:
    proc = start(args, **popen)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def report(out: Path) -> dict:
    return read_report(out)


def wait_for_stage(proc: subprocess.Popen, out: Path, stage: str, timeout: float = 300) -> None:
    """Poll report.json (written after every stage) until `stage` of this run is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"build ended before stage {stage}"
        try:
            current = report(out)
            if current.get("pid") == proc.pid and stage in current["stages"]:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"stage {stage} not reached in {timeout} s")


def interrupt(out: Path, stage: str, signum: int) -> subprocess.CompletedProcess:
    proc = start([*BUILD, "--out", str(out)])
    wait_for_stage(proc, out, stage)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def previous_result(tmp_path_factory) -> Path:
    """A complete build, copied into each test that needs a folder with an earlier result."""
    out = tmp_path_factory.mktemp("previous") / "out"
    assert deploy([*BUILD, "--out", str(out)]).returncode == 0
    return out


@pytest.mark.parametrize(
    ("stage", "signum"),
    [
        ("prepare", signal.SIGTERM),  # lands in calibration or export
        ("lint", signal.SIGINT),  # engine build, kernel check or accuracy
        ("accuracy", signal.SIGTERM),  # the timed latency runs
    ],
)
def test_a_signal_at_any_stage_leaves_a_report_saying_interrupted(
    stage, signum, previous_result, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(previous_result, out)
    result = interrupt(out, stage, signum)
    name = signal.Signals(signum).name
    assert_one_line(result, 128 + signum, f"interrupted by {name}")
    written = report(out)
    assert written["status"] == f"interrupted by {name}"
    assert written["exit_code"] == 128 + signum
    assert stage in written["stages"] and "latency" not in written["stages"]
    assert report_problems(out) == []


def test_sigkill_leaves_no_report_vouching_for_replaced_files(previous_result, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(previous_result, out)
    proc = start([*BUILD, "--out", str(out)])
    wait_for_stage(proc, out, "export")
    proc.kill()
    proc.wait(timeout=60)
    killed = report(out)
    assert killed["status"] == "running" and killed["pid"] == proc.pid
    assert {"fp32_onnx", "qdq_onnx"} <= set(killed["artifacts"])  # only what it rewrote
    # a write cut short by SIGKILL leaves a temp file of the dead writer, and nothing else
    debris = out / f".model.qdq.onnx.{proc.pid}.0badf00d.tmp"
    debris.write_bytes(b"half a model")
    left = [p for p in report_problems(out) if not p.startswith("temp file left: ")]
    assert left == [] and f"temp file left: {debris}" in report_problems(out)

    # the next build takes the folder over: its export alone shows the cleanup (faster)
    rerun = deploy([*BUILD, "--export-only", "--out", str(out)])
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.rglob("*.tmp"))
    assert report(out)["status"] == "ok" and report_problems(out) == []


def test_a_second_build_into_a_busy_folder_fails_fast(previous_result, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(previous_result, out)
    before = (out / "report.json").read_bytes()
    with owned(out):  # this process is the build in progress
        started = time.monotonic()
        result = deploy([*BUILD, "--out", str(out)])
    assert_one_line(result, errors.ENVIRONMENT_FAULT, str(out), "in use", str(os.getpid()))
    assert time.monotonic() - started < 60
    assert (out / "report.json").read_bytes() == before


def _file_size_limit(limit: int):
    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


def test_a_full_disk_is_an_environment_fault_naming_the_file(tmp_path):
    out = tmp_path / "out"
    # report.json fits; the fp32 ONNX model (about 40 kB) does not
    result = deploy([*BUILD, "--out", str(out)], preexec_fn=_file_size_limit(30_000))
    assert_one_line(result, errors.ENVIRONMENT_FAULT, "File too large", "model.fp32.onnx")
    assert report(out)["status"].startswith("failed: File too large")
    assert report(out)["exit_code"] == errors.ENVIRONMENT_FAULT
    assert report_problems(out) == []
    assert not list(out.rglob("*.tmp"))


def _as_unprivileged() -> None:
    """root writes through any permission bit: run the build as nobody to see a read-only
    folder as users do."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


def _runs_unprivileged(env: dict[str, str]) -> bool:
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import qat_deploy.deploy.app.cli"],
            cwd=REPO,
            env=env,
            preexec_fn=_as_unprivileged,
            capture_output=True,
        )
    except PermissionError:  # the interpreter lives where nobody may not go (/root/.pyenv)
        return False
    return probe.returncode == 0


def _refuses_new_files(folder: Path) -> bool:
    try:
        os.close(os.open(folder / ".deploy.lock", os.O_RDWR | os.O_CREAT))
    except OSError:
        return folder.is_dir()
    os.unlink(folder / ".deploy.lock")
    return False


def test_a_read_only_output_folder_is_an_environment_fault():
    root = Path(tempfile.mkdtemp(prefix="deploy-ro-"))
    try:
        root.chmod(0o755)
        out = root / "out"
        out.mkdir(mode=0o555)
        env = _env(HOME=str(root))
        if _runs_unprivileged(env):
            result = deploy([*BUILD, "--out", str(out)], env=env, preexec_fn=_as_unprivileged)
            assert list(out.iterdir()) == []
        elif _refuses_new_files(Path("/sys/kernel")):
            # nobody cannot run this interpreter; sysfs refuses new files even to root: a real
            # folder this process cannot write in
            out = Path("/sys/kernel")
            result = deploy([*BUILD, "--out", str(out)])
        else:
            pytest.skip("no folder this user cannot write in")
        assert_one_line(result, errors.ENVIRONMENT_FAULT, f"cannot write in --out {out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("parent_is_file", [False, True])
def test_out_that_is_a_file_is_an_environment_fault(tmp_path, parent_is_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out" if parent_is_file else blocker
    result = deploy([*BUILD, "--out", str(out)])
    assert_one_line(result, errors.ENVIRONMENT_FAULT, str(blocker), "is a file")
    assert blocker.read_text() == "not a folder"


def test_a_broken_backend_install_fails_before_any_work(tmp_path):
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('libopenvino.so.2540: cannot open shared object file')\n"
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])
    out = tmp_path / "out"
    result = deploy(["build", "--target", "openvino", "--out", str(out)], env=env)
    assert_one_line(result, errors.BACKEND_UNAVAILABLE, "openvino", "libopenvino.so")
    assert not list(out.glob("*.onnx"))
    assert report(out)["exit_code"] == errors.BACKEND_UNAVAILABLE and report(out)["stages"] == {}


HOSTILE = {
    "factory calls sys.exit": (
        "tests.fixtures.hostile_models:exits",
        [],
        "it exited with code 3",
    ),
    "module parses argv at import": (
        "tests.fixtures.argv_parsing_module:net",
        [],
        "the following arguments are required: --lr",
    ),
    "data-dependent control flow": (
        "tests.fixtures.hostile_models:chatty_branch",
        [],
        "data-dependent",
    ),
    "input shape the model rejects": ("resnet18", ["--input-shape", "1x4x64x64"], "1x4x64x64"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_user_code_is_one_line_of_bad_input(case, tmp_path):
    model, extra, message = HOSTILE[case]
    result = deploy([*BUILD, "--model", model, *extra, "--out", str(tmp_path / "out")])
    assert_one_line(result, errors.BAD_INPUT, message)
    assert "usage:" not in result.stdout + result.stderr


def test_inputs_too_big_for_memory_fail_before_allocating(tmp_path):
    result = deploy([*BUILD, "--input-shape", "64x1x4000x4000", "--out", str(tmp_path / "out")])
    assert_one_line(result, errors.ENVIRONMENT_FAULT, "GiB", "64x1x4000x4000")


def test_a_two_output_model_builds_on_its_first_output(tmp_path):
    out = tmp_path / "out"
    model = "tests.fixtures.hostile_models:two_outputs"
    result = deploy([*BUILD, "--model", model, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert report(out)["status"] == "ok" and report_problems(out) == []


def test_bench_into_a_file_fails_before_timing(tmp_path):
    blocker = tmp_path / "bench.json"
    blocker.write_text("{}")
    result = deploy(["bench", "-o", str(blocker)])
    assert_one_line(result, errors.ENVIRONMENT_FAULT, str(blocker), "is a file")
    assert "exporting" not in result.stderr


def test_ctrl_c_during_a_baseline_update_exits_130_and_writes_nothing(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    baseline = tmp_path / "b.json"
    args = ["check", "--baseline", str(baseline), "--update-baseline"]
    proc = start(
        [*args, "--model", "mnist_cnn", "--target", "onnxruntime", "--min-time", "60"],
        env=_env(TMPDIR=str(scratch)),
    )
    deadline = time.monotonic() + 300
    while not list(scratch.glob("deploy-check-*")):  # the check is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(1.0)  # past mkdtemp, into the block that owns the folder
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line(result, 130, "interrupted by SIGINT")
    assert not baseline.exists()
    assert not list(scratch.glob("deploy-check-*"))  # its temp folder went too
