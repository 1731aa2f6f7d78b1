"""The ``ebca`` command line against the in-process fake API (parsing, output, exit codes)."""

from __future__ import annotations

import io
import json
from collections import deque
from pathlib import Path

import pytest
from sdk_fakes import FakeAPI, Fault, serve_cli_from

from ebca_client import RetryPolicy, cli
from ebca_client.models import EditSpec, JobInfo, ScheduleSpec

FAST = RetryPolicy(max_retries=2, backoff_initial=0.001, backoff_max=0.01)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    fake = FakeAPI()
    serve_cli_from(fake, monkeypatch, FAST)
    return fake


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def finish_on_first_poll(api: FakeAPI, images: int = 1) -> None:
    """Make every job the fake creates succeed when it is first read."""
    original = api.submit

    def submit(request, endpoint):  # type: ignore[no-untyped-def]
        response = original(request, endpoint)
        job_id = response.json()["id"]
        api.script(job_id, api.succeeded(job_id, images=images))
        return response

    api.submit = submit  # type: ignore[method-assign]


def test_generate_maps_flags_to_the_documented_body_and_saves(api: FakeAPI, tmp_path: Path) -> None:
    finish_on_first_poll(api)
    code, out, err = run(
        "generate", "a lion with a crown", "--gamma-attn", "0.01", "--gamma-norm", "0.02",
        "--weight", "crown=2.5", "--weight", "5=1.5", "--schedule", "step:0.6", "--steps", "7",
        "--seed", "3", "--edit", "monet painting;alpha=1.3;alpha_tau=0.2", "--edit", "blur;direction=not",
        "-o", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    body = json.loads(api.seen[0].content)
    assert body["energy"] == {
        "gamma_attn": 0.01,
        "gamma_norm": 0.02,
        "schedule": {"kind": "step", "tau": 0.6},
        "token_weights": {"crown": 2.5, "5": 1.5},
    }
    assert (body["steps"], body["seed"]) == (7, 3)
    assert [(e["prompt"], e.get("alpha"), e["direction"], e.get("alpha_tau")) for e in body["edits"]] == [
        ("monet painting", 1.3, "and", 0.2),
        ("blur", None, "not", None),  # not sent: the model's edit defaults apply
    ]
    saved = Path(out.strip())
    assert saved.parent == tmp_path and saved.read_bytes() == api.image
    assert "succeeded: 1 image(s)" in err


def test_json_output_is_machine_readable(api: FakeAPI, tmp_path: Path) -> None:
    finish_on_first_poll(api, images=2)
    code, out, _ = run("--json", "-q", "generate", "a cat", "-n", "2", "-o", str(tmp_path))
    assert code == 0
    doc = json.loads(out)
    assert doc["job"]["status"] == "succeeded"
    assert [Path(p).name for p in doc["files"]] == [f"{doc['job']['id']}-0.png", f"{doc['job']['id']}-1.png"]


def test_no_wait_prints_the_job_id(api: FakeAPI) -> None:
    code, out, _ = run("generate", "a cat", "--no-wait")
    assert code == 0 and out.strip() in api.jobs


def test_api_validation_error_is_one_line_exit_3(api: FakeAPI) -> None:
    code, out, err = run("generate", "")
    assert code == cli.EXIT_REJECTED and out == ""
    assert err == "ebca: API error 422 validation_error: prompt must not be empty [field prompt]\n"


def test_unreachable_api_exit_4(api: FakeAPI) -> None:
    api.faults.extend(Fault("drop_before") for _ in range(5))
    code, _, err = run("models")
    assert code == cli.EXIT_UNAVAILABLE
    assert err.startswith("ebca: cannot reach the API at http://api.test") and err.count("\n") == 1


def test_failed_job_exit_1_with_reason(api: FakeAPI) -> None:
    code, job_id, _ = run("generate", "a cat", "--no-wait")
    api.script(
        job_id.strip(), {"status": "failed", "error": {"code": "out_of_memory", "message": "CUDA OOM"}}
    )
    code, _, err = run("jobs", "wait", job_id.strip())
    assert code == cli.EXIT_JOB_FAILED
    assert "out_of_memory: CUDA OOM" in err


def test_wait_timeout_exit_5(api: FakeAPI) -> None:
    _, job_id, _ = run("generate", "a cat", "--no-wait")
    code, _, err = run("--timeout", "0.2", "jobs", "wait", job_id.strip())
    assert code == cli.EXIT_TIMEOUT
    assert f"ebca jobs wait {job_id.strip()}" in err


def test_jobs_get_and_cancel(api: FakeAPI) -> None:
    _, job_id, _ = run("generate", "a cat", "--no-wait")
    job_id = job_id.strip()
    code, out, _ = run("jobs", "get", job_id)
    assert code == 0 and f"id:       {job_id}" in out and "status:   queued" in out
    code, out, _ = run("jobs", "cancel", job_id)
    assert code == 0 and out == f"job {job_id} canceled\n"
    # Cancel is idempotent for the client: an already canceled job is reported, not an error...
    assert run("jobs", "cancel", job_id)[:2] == (0, f"job {job_id} canceled\n")
    # ...but a job that finished otherwise cannot be canceled: the server's 409 comes through.
    api.jobs[job_id].update(api.succeeded(job_id))
    code, _, err = run("jobs", "cancel", job_id)
    assert code == cli.EXIT_REJECTED and "409 conflict" in err and "already succeeded" in err
    code, _, err = run("jobs", "get", "nope")
    assert code == cli.EXIT_REJECTED and "404 not_found" in err


def test_edit_commands_build_their_requests(api: FakeAPI, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(api.image)
    assert run("edit", "real", str(image), "a photo", "--edit", "snow", "--regularize", "--no-wait")[0] == 0
    assert run("edit", "inpaint", "job:abc:1", "job:abc", "teddy bear", "--no-wait")[0] == 0
    assert run("edit", "synthetic", "src123", "--edit", "snow;alpha=0.5", "--no-wait")[0] == 0
    real, inpaint, synthetic = api.requests_to("POST", "/edit")
    assert real.headers["content-type"].startswith("multipart/form-data")
    body = json.loads(inpaint.content)
    assert body["image_ref"] == {"job_id": "abc", "index": 1} and body["mask_ref"] == {
        "job_id": "abc",
        "index": 0,
    }
    body = json.loads(synthetic.content)
    assert body == {
        "mode": "synthetic",
        "source_job_id": "src123",
        "edits": [{**body["edits"][0], "alpha": 0.5}],
    }


def test_edit_real_without_edit_and_missing_file_exit_2(api: FakeAPI, tmp_path: Path) -> None:
    code, _, err = run("edit", "real", str(tmp_path / "x.png"), "a photo")
    assert code == cli.EXIT_USAGE and "at least one --edit" in err
    code, _, err = run("edit", "real", str(tmp_path / "x.png"), "a photo", "--edit", "snow")
    assert code == cli.EXIT_USAGE and err.startswith("ebca: image: cannot read")
    assert api.seen == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weight", "crown"], "WORD=WEIGHT"),
        (["--weight", "crown=big"], "not a number"),
        (["--edit", ";alpha=1"], "needs a prompt"),
        (["--edit", "x;beta=1"], "KEY one of"),
        (["--edit", "x;direction=or"], "'and' or 'not'"),
        (["--schedule", "cosine"], "must be one of"),
    ],
)
def test_bad_option_values_exit_2_naming_the_option(api: FakeAPI, argv: list[str], message: str) -> None:
    code, _, err = run("generate", "a cat", *argv)
    assert code == cli.EXIT_USAGE and message in err
    assert api.seen == []


def test_parse_helpers() -> None:
    assert cli.parse_edit("a b;alpha=2;gamma_tau=0.3") == EditSpec(prompt="a b", alpha=2.0, gamma_tau=0.3)
    assert cli.parse_schedule("linear:2") == ScheduleSpec(kind="linear", ratio=2.0)
    assert cli.parse_schedule("constant") == ScheduleSpec(kind="constant")
    assert cli.parse_weight("a=b=2") == ("a=b", 2.0)


def test_progress_line_shows_queue_then_steps() -> None:
    queued = JobInfo(id="abcdef0123", status="queued", queue_position=2)
    running = JobInfo.model_validate(
        {"id": "abcdef0123", "status": "running", "progress": {"stage": "denoising", "step": 3, "total": 12}}
    )
    assert cli.ProgressDisplay.describe(queued) == "job abcdef01 queued (2 ahead)"
    first = queued.model_copy(update={"queue_position": 0})
    assert cli.ProgressDisplay.describe(first) == "job abcdef01 queued (next in line)"
    assert cli.ProgressDisplay.describe(running, bar_width=4) == "job abcdef01 denoising [#---] step 3/12"
    stream = io.StringIO()
    display = cli.ProgressDisplay(stream, enabled=True)
    display.update(queued)
    display.update(running)
    display.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 3 and "queued (2 ahead)" in text and "step 3/12" in text
    silent = io.StringIO()
    cli.ProgressDisplay(silent, enabled=False).update(queued)
    assert silent.getvalue() == ""


def test_retried_cli_submit_makes_one_job(api: FakeAPI) -> None:
    api.faults = deque([Fault("drop_after")])
    code, out, _ = run("generate", "a cat", "--no-wait")
    assert code == 0 and list(api.jobs) == [out.strip()]


def test_serve_arguments_are_split_off_for_serve_sh() -> None:
    parser = cli.build_parser()
    serve = cli.PASS_THROUGH["serve"]
    split = cli.split_pass_through
    assert split(parser, ["serve", "--port", "8001", "--help"]) == (serve, ["--port", "8001", "--help"])
    assert split(parser, ["--url", "http://x:1", "serve"]) == (serve, [])
    # "serve" as a prompt is not the serve command.
    assert split(parser, ["generate", "serve", "--steps", "2"]) is None
    assert split(parser, ["models"]) is None


def test_ctrl_c_while_waiting_leaves_the_job_running_and_says_so(
    api: FakeAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(self: cli.ProgressDisplay, info: JobInfo) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressDisplay, "update", interrupt)
    code, out, err = run("generate", "a cat")
    (job_id,) = api.jobs
    assert code == cli.EXIT_INTERRUPTED and out == ""
    assert f"interrupted: job {job_id} continues on the server (stop it: ebca jobs cancel {job_id})" in err
    assert api.jobs[job_id]["status"] == "queued"
