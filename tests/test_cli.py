"""The command line: BIDS-App arguments, clear errors, exit codes."""
import pytest

from lesiontrack.cli import build_parser, main


def test_participant_label_spellings():
    p = build_parser()
    a = p.parse_args(["run", "b", "o", "participant", "--participant-label", "01", "sub-02"])
    b = p.parse_args(["run", "b", "o", "participant", "--participant_label", "01", "sub-02"])
    assert a.participant_label == b.participant_label == ["01", "sub-02"]
    assert p.parse_args(["run", "b", "o", "group"]).analysis_level == "group"
    with pytest.raises(SystemExit):
        p.parse_args(["run", "b", "o", "subject"])


def test_output_inside_input_is_refused(tmp_path, capsys):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "ses-01" / "anat").mkdir(parents=True)
    assert main(["run", str(bids), str(bids), "participant"]) == 2
    assert "is the BIDS input folder" in capsys.readouterr().err
    assert main(["run", str(bids), str(bids / "sub-01" / "x"), "participant"]) == 2
    assert "inside the subject folder" in capsys.readouterr().err


def test_missing_bids_dir_and_bad_config(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[segment]\ntypo_setting = 1\n")
    assert main(["run", str(tmp_path), str(tmp_path / "out"), "participant", "--config", str(cfg)]) == 2
    assert "typo_setting" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "lesiontrack" in capsys.readouterr().out
