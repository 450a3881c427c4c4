"""`qgen report` on a study stored in S3: the Parquet tables are read through the store
(pyarrow's S3 filesystem against a local moto S3 server, the real protocol) and the report
is written to a local --out folder, the same report as from a local copy of the study."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from qgen_ray import cli
from qgen_ray.analysis import write_report
from qgen_ray.analysis.synthetic import write_synthetic_study
from tests.conftest import s3_env

BUCKET = "qgen-studies"


@pytest.fixture()
def s3_study(s3_endpoint, tmp_path, monkeypatch):
    """A synthetic study written locally and copied into the bucket; (local, uri)."""
    for key, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    local = write_synthetic_study(tmp_path / "local" / "remote_study")
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    pafs.copy_files(str(local), f"{BUCKET}/remote_study", destination_filesystem=fs)
    return local, f"s3://{BUCKET}/remote_study", fs


def _without_location(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("- study folder:"))


def test_report_on_s3_reads_through_the_store_and_writes_locally(s3_study, tmp_path):
    local, uri, fs = s3_study
    out = tmp_path / "report_out"
    cli.main(["report", uri, "--out", str(out)])
    remote_md = (out / "report.md").read_text()
    assert f"- study folder: {uri}" in remote_md
    assert (out / "report.html").exists() and list(out.glob("*.png"))
    local_md = write_report(local).read_text()
    assert _without_location(remote_md) == _without_location(local_md)
    # nothing was written into the study on S3
    listed = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/remote_study", recursive=True))
    assert not [i.path for i in listed if "/report" in i.path or i.path.endswith(".lock")]


def test_report_on_s3_without_out_is_one_line_and_writes_nothing(s3_study, tmp_path, capsys):
    _, uri, fs = s3_study
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", uri])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
    listed = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/remote_study", recursive=True))
    assert not [i.path for i in listed if "/report" in i.path]
