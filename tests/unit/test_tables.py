"""pipeline.tables: the one clinical reader, split parser and leakage check, and the rules ``check_cohort`` reports
and the stages raise with the same message (plain CSV files, no images)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from pipeline import tables
from pipeline.errors import PipelineError

SLIDES = [f"s{i}" for i in range(6)]
CLINICAL = """case_id,slide_id,survival_months,censorship,response,age
p0,s0,10.5,0,1,60
p0,s1,10.5,0,1,60
p1,s2,20,1,0,70
p2,s3,5,0,0,55
p3,s4,30,0,1,65
p4,s5,12,1,1,72
"""
SPLIT = "train,val\ns0,s3\ns1,s4\ns2,\ns5,\n"


def _cohort(root: Path, clinical: str = CLINICAL, split: str = SPLIT) -> Path:
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "clinical.csv").write_text(clinical)
    (root / "splits" / "splits_0.csv").write_text(split)
    return root


def _errors(root: Path) -> list[tables.Finding]:
    return [f for f in tables.check_cohort_tables(root, SLIDES) if f.level == tables.ERROR]


def _stage(root: Path, task: str = "survival") -> dict[str, list[str]]:
    """What MICA does with the same files: read the clinical table for ``task``, then the fold."""
    return tables.read_fold(root / "splits" / "splits_0.csv", tables.read_clinical_table(root / "clinical.csv", task))


def test_valid_tables_have_no_finding(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _cohort(tmp_path)
    assert tables.check_cohort_tables(root, SLIDES) == []
    clinical = tables.read_clinical_table(root / "clinical.csv")
    assert clinical.loc["s2", "censorship"] == 1 and clinical["age"].dtype.kind in "if"
    assert tables.case_of(clinical)["s1"] == "p0"
    with caplog.at_level(logging.INFO, logger="pipeline.tables"):
        assert _stage(root) == {"train": ["s0", "s1", "s2", "s5"], "val": ["s3", "s4"]}
    # the fold's patient and event counts are logged (an inverted censorship column shows here)
    assert "fold 0): train 3 patients (1 events), val 2 patients (2 events)" in caplog.text


def test_original_release_split_layouts(tmp_path: Path) -> None:
    """An unnamed index column, the original's patient_* columns, numeric ids written as floats, spaces, empty
    cells: the ids are the same for every reader."""
    p = tmp_path / "splits_0.csv"
    p.write_text(",train,val,patient_train,patient_val\n0, 4 ,7.0,x,y\n1,5,,x,\n2,6.0,,x,\n")
    split, found = tables.parse_split(p)
    assert found == [] and split == {"train": ["4", "5", "6"], "val": ["7"]}
    assert tables.read_split(p, "train") == ["4", "5", "6"]


@pytest.mark.parametrize("text, column, match", [
    ("train,val\ns0,\ns1,\n", "val", "column 'val' lists no slides"),
    ("train\ns0\n", "val", "has no column 'val'"),
    ("train,val\ns0,s3\ns0,\n", "train", "lists slides more than once: \\['s0'\\]"),
])
def test_split_file_findings_are_the_parsers_errors(tmp_path: Path, text: str, column: str, match: str) -> None:
    """check_cohort's finding and the stage's parser's error are the same line."""
    root = _cohort(tmp_path, split=text)
    found = [f for f in _errors(root) if f.column == "splits"]
    assert found
    with pytest.raises(PipelineError, match=match) as e:
        tables.read_split(root / "splits" / "splits_0.csv", column)
    assert str(e.value) == found[0].message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="split file not found: .* does not exist"):
        tables.read_split(tmp_path / "nope.csv", "train")
    with pytest.raises(PipelineError, match="clinical table .* does not exist"):
        tables.read_clinical_table(tmp_path / "nope.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(PipelineError, match="cannot read the split file .* as CSV"):
        tables.read_split(tmp_path / "bin.csv", "train")


def test_response_yes_no_names_file_patient_and_value(tmp_path: Path) -> None:
    """A response coded yes/no: one error saying 0/1 is expected, naming the file, the patient and the value."""
    root = _cohort(tmp_path, CLINICAL.replace(",0,1,", ",0,yes,").replace(",1,0,", ",1,no,"))
    err = _errors(root)
    assert len(err) == 1
    msg = err[0].message
    assert str(root / "clinical.csv") in msg and "patient p0" in msg and "'yes'" in msg and "0 or 1" in msg
    assert "'no'" in msg  # the other values are listed too
    with pytest.raises(PipelineError) as e:
        tables.read_clinical_table(root / "clinical.csv", "response")
    assert str(e.value) == msg


def test_single_yes_among_01_is_an_error_not_a_drop(tmp_path: Path) -> None:
    """One "yes" among 0/1 values was read as missing and the patient dropped with a warning naming neither."""
    root = _cohort(tmp_path, CLINICAL.replace("p3,s4,30,0,1,", "p3,s4,30,0,yes,"))
    with pytest.raises(PipelineError, match=r"response of patient p3 \(slide s4, line 6\) is 'yes': 0 or 1 is "
                                            r"expected") as e:
        tables.read_clinical_table(root / "clinical.csv", "response")
    assert "\n" not in str(e.value)
    # an empty response is a patient without a value: a warning naming it (the stage leaves it out)
    root = _cohort(tmp_path, CLINICAL.replace("p3,s4,30,0,1,", "p3,s4,30,0,,"))
    assert _errors(root) == []
    warn = [f.message for f in tables.check_cohort_tables(root, SLIDES) if f.level == tables.WARNING]
    assert any("patients p3 have no response value" in m for m in warn)
    assert pd.isna(tables.read_clinical_table(root / "clinical.csv", "response").loc["s4", "response"])


@pytest.mark.parametrize("old, new, match", [
    ("p1,s2,20,1,", "p1,s2,20,2,", r"censorship of patient p1 \(slide s2, line 4\) is '2': 0 or 1 is expected"),
    ("p1,s2,20,1,", "p1,s2,-3,1,", r"survival_months of patient p1 \(slide s2, line 4\) is '-3'"),
    ("p1,s2,20,1,", "p1,s2,,1,", r"slides s2 \(patients p1\) have no survival_months"),
    ("p0,s1,10.5,", "p0,s1,11.5,", r"patients p0 have different 'survival_months' on different slides"),
    ("p1,s2,", "p1,s1,", r"slides listed more than once: \['s1'\]"),
    ("p1,s2,", ",s2,", r"slide s2 \(line 4\) has no case_id"),
])
def test_clinical_rules_are_one_set(tmp_path: Path, old: str, new: str, match: str) -> None:
    """Each broken table: check_cohort reports exactly the error the survival stage raises."""
    root = _cohort(tmp_path, CLINICAL.replace(old, new))
    err = _errors(root)
    assert err, f"check_cohort says OK on {new}"
    with pytest.raises(PipelineError, match=match) as e:
        _stage(root)
    assert str(e.value).startswith(err[0].message)


def test_outcome_columns_depend_on_the_task(tmp_path: Path) -> None:
    """The rule that was the reverse of stage 04's: a table with only case_id,slide_id is what HEX training reads
    (check_cohort: a warning for the MICA stages, not an error), while a split slide without a clinical row stops
    HEX training (check_cohort: an error, no longer a warning)."""
    root = _cohort(tmp_path, "case_id,slide_id\n" + "".join(f"p{i},s{i}\n" for i in range(6)))
    assert _errors(root) == []
    assert any("MICA stages need survival_months,censorship" in f.message
               for f in tables.check_cohort_tables(root, SLIDES))
    table = tables.read_clinical_table(root / "clinical.csv", "patients")
    assert tables.read_fold(root / "splits" / "splits_0.csv", table)["val"] == ["s3", "s4"]
    with pytest.raises(PipelineError, match=r"lacks columns \['survival_months', 'censorship'\]"):
        tables.read_clinical_table(root / "clinical.csv", "survival")
    root = _cohort(tmp_path, CLINICAL.replace("p3,s4,30,0,1,65\n", ""))
    err = _errors(root)
    assert len(err) == 1 and "names slides not in" in err[0].message and "['s4']" in err[0].message
    with pytest.raises(PipelineError) as e:
        tables.read_fold(root / "splits" / "splits_0.csv",
                         tables.read_clinical_table(root / "clinical.csv", "patients"))
    assert str(e.value) == err[0].message
    split = tables.read_fold(root / "splits" / "splits_0.csv",
                             tables.read_clinical_table(root / "clinical.csv", "patients"), allow_unknown=True)
    assert split["val"] == ["s3", "s4"]


def test_patient_leakage(tmp_path: Path) -> None:
    assert tables.patient_leaks({"train": ["a", "b"], "val": ["c"]}, {"a": "p", "c": "p"}) == [
        ("p", "train", ["a"], "val", ["c"])]
    assert tables.patient_leaks({"train": ["a"], "val": ["c"]}, {}) == []  # unknown slides: their own patient
    root = _cohort(tmp_path, split="train,val\ns0,s1\ns2,s3\n")  # s0 and s1 are p0's
    err = _errors(root)
    assert len(err) == 1 and "patient p0 is in both 'train' (slides ['s0']) and 'val' (slides ['s1'])" in err[0].message
    with pytest.raises(PipelineError) as e:
        _stage(root)
    assert str(e.value) == err[0].message


def test_fold_without_events(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Validation without events: the same warning (fold and counts) from check_cohort and the stage; training
    without events: the same error."""
    root = _cohort(tmp_path, CLINICAL.replace("p2,s3,5,0,", "p2,s3,5,1,").replace("p3,s4,30,0,", "p3,s4,30,1,"))
    found = tables.check_cohort_tables(root, SLIDES)
    assert [f.level for f in found] == [tables.WARNING]
    msg = found[0].message
    assert "fold 0 has no event in 'val'" in msg and "val 2 patients (0 events)" in msg
    assert "train 3 patients (1 events)" in msg
    with caplog.at_level(logging.WARNING, logger="pipeline.tables"):
        _stage(root)
    assert msg in caplog.text
    root = _cohort(tmp_path, CLINICAL.replace("p0,s0,10.5,0,", "p0,s0,10.5,1,").replace("p0,s1,10.5,0,",
                                                                                          "p0,s1,10.5,1,"))
    err = _errors(root)
    assert len(err) == 1 and "fold 0 has no event in 'train'" in err[0].message
    with pytest.raises(PipelineError) as e:
        _stage(root)
    assert str(e.value) == err[0].message
    _stage(root, "response")  # events are survival's rule


def test_ids_against_the_cohort(tmp_path: Path) -> None:
    root = _cohort(tmp_path, CLINICAL + "p9,s9,1,0,0,50\n", "train,val\ns0,s3\ns1,s4\ns2,s8\ns5,\n")
    found = tables.check_cohort_tables(root, SLIDES, "he/")
    err = [f.message for f in found if f.level == tables.ERROR]
    assert any("names 1 slides that he/ does not hold: s8" in m for m in err)
    assert any("lists 1 slides that he/ does not hold: s9" in m for m in (f.message for f in found))


def test_hex_training_reads_the_ids_only(tmp_path: Path) -> None:
    """An outcome value MICA rejects (whatever its task: it reads every outcome) does not stop HEX training."""
    root = _cohort(tmp_path, CLINICAL.replace("p3,s4,30,0,1,", "p3,s4,30,0,yes,"))
    assert _errors(root)
    with pytest.raises(PipelineError, match="response of patient p3 .* is 'yes'"):
        _stage(root, "survival")
    table = tables.read_clinical_table(root / "clinical.csv", "patients")
    assert tables.read_fold(root / "splits" / "splits_0.csv", table)["val"] == ["s3", "s4"]
