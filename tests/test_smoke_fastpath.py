from dispatch.job import JobSpec, JobState


def test_an_echo_job_runs_and_its_output_comes_back(worker, client, pool, tmp_path):
    result = client.submit(JobSpec("echo", ("hi",), pool=pool)).wait(timeout_s=30)
    assert result.state is JobState.EXITED
    assert result.exit_code == 0
    result.extract(tmp_path / "out")
    assert (tmp_path / "out" / "job.out").read_text() == "hi\n"
