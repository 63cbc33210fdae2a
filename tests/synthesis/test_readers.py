"""Dataset readers: every format parsed exactly from tiny fixture files written here (never real
data), thresholds, prefix dropping, counted drops, Exp-BLIP frame sampling, subject-exclusive
folds, and file:line errors on malformed rows."""

import json
import re

import pytest

from expvl.synthesis.readers import (
    READERS,
    AffectNetConfig,
    BP4DConfig,
    CSVConfig,
    DISFAConfig,
    EmotioNetConfig,
    FoldError,
    RAFAUConfig,
    ReaderError,
    folds,
    read_affectnet,
    read_bp4d,
    read_csv_generic,
    read_disfa,
    read_emotionet,
    read_gft,
    read_rafau,
    read_rafdb,
    read_rafdb_compound,
    sample_video_frames,
)
from expvl.vocab.facs import AU_NAMES, DATASET_AUS
from expvl.vocab.records import Record
from tests.helpers.datasets import BP4D_HEADER, bp4d_row, write_disfa, write_file

# ----------------------------------------------------------------------------------------- BP4D

def test_bp4d_parses_labels_exactly(tmp_path):
    write_file(tmp_path / "AUCoding/AU_OCC/F001_T1.csv", "\n".join([
        BP4D_HEADER,
        bp4d_row(2440, on=("AU1", "AU12")),
        bp4d_row(2441, on=("AU12",), nine=("AU4",)),
        bp4d_row(2442, all_nine=True),
    ]) + "\n")
    write_file(tmp_path / "AUCoding/AU_OCC/M003_T8.csv",
               BP4D_HEADER + "\n" + bp4d_row(7, on=("AU24",)) + "\n")
    recs = read_bp4d(tmp_path)
    by_id = {r.id: r for r in recs}
    assert sorted(by_id) == ["bp4d/F001/T1/2440", "bp4d/F001/T1/2441", "bp4d/M003/T8/7"]
    r = by_id["bp4d/F001/T1/2440"]
    assert r.aus == {a: int(a in ("AU1", "AU12")) for a in DATASET_AUS["bp4d"]}
    assert r.image == "img/F001/T1/2440.jpg" and r.subject == "F001" and r.split == "all"
    assert r.meta == {"task": "T1", "frame": 2440} and r.emotion is None and not r.captions
    # 9 = not coded: the AU is absent from the dict, not negative
    assert "AU4" not in by_id["bp4d/F001/T1/2441"].aus and by_id["bp4d/F001/T1/2441"].aus["AU12"] == 1
    assert by_id["bp4d/M003/T8/7"].positive_aus == ["AU24"]
    assert sum(recs.dropped.values()) == 1  # the all-9 frame, counted
    # restricting subjects and zero-padded image names
    only = read_bp4d(tmp_path, BP4DConfig(subjects=["M003"], image_template="S/{subject}/{task}/{frame:04d}.jpg"))
    assert [r.image for r in only] == ["S/M003/T8/0007.jpg"]


def test_bp4d_errors_name_file_and_line(tmp_path):
    path = write_file(tmp_path / "AUCoding/AU_OCC/F001_T1.csv",
                      BP4D_HEADER + "\n" + bp4d_row(1) + "\n" + bp4d_row(2).replace(",0,", ",2,", 1) + "\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:3:") + ".*AU1 occurrence"):
        read_bp4d(tmp_path)
    write_file(path, BP4D_HEADER + "\n" + bp4d_row(1) + "\n1,0,0\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:3:") + ".*columns"):
        read_bp4d(tmp_path)
    write_file(path, BP4D_HEADER + "\n" + "x" + bp4d_row(1)[1:] + "\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:2:") + ".*frame number"):
        read_bp4d(tmp_path)
    write_file(path, BP4D_HEADER.replace(",24", "") + "\n")
    with pytest.raises(ReaderError, match=r"no column for \['AU24'\]"):
        read_bp4d(tmp_path)
    with pytest.raises(ReaderError, match="unknown action unit '3'"):  # named
        read_bp4d(tmp_path, BP4DConfig(aus=["AU1", "3"]))
    path.unlink()
    write_file(tmp_path / "AUCoding/AU_OCC/notes.csv", BP4D_HEADER + "\n")
    with pytest.raises(ReaderError, match="notes.csv.*<subject>_<task>"):
        read_bp4d(tmp_path)


# ------------------------------------------------------------------------------ frame sampling

def _frames(n, on_at=()):
    return [Record(id=f"v/{i}", image=f"{i}.jpg", source="t", split="all",
                   aus={"AU1": int(i in on_at), "AU2": 0}) for i in range(n)]


def test_frame_sampling_one_in_ten_plus_changes():
    kept = sample_video_frames(_frames(25, on_at=(13, 14)), every=10)
    # 0, 10, 20 by the 1-in-10 rule; 13 (0->1) and 15 (1->0) by the AU-change rule; 14 equals 13
    assert [r.id for r in kept] == ["v/0", "v/10", "v/13", "v/15", "v/20"]
    assert len(sample_video_frames(_frames(7), every=10)) == 1
    assert len(sample_video_frames(_frames(7), every=1)) == 7


def test_frame_sampling_in_reader_is_per_video(tmp_path):
    rows = [bp4d_row(100 + i, on=("AU6",) if i in (4, 5) else ()) for i in range(12)]
    write_file(tmp_path / "AUCoding/AU_OCC/F001_T1.csv", BP4D_HEADER + "\n" + "\n".join(rows) + "\n")
    write_file(tmp_path / "AUCoding/AU_OCC/F001_T2.csv", BP4D_HEADER + "\n" + "\n".join(rows[:3]) + "\n")
    recs = read_bp4d(tmp_path, BP4DConfig(frame_sampling=True))
    t1 = [r.meta["frame"] for r in recs if r.meta["task"] == "T1"]
    t2 = [r.meta["frame"] for r in recs if r.meta["task"] == "T2"]
    assert t1 == [100, 104, 106, 110]  # each video restarts its own 1-in-10 count
    assert t2 == [100]
    assert sum(recs.dropped.values()) == (12 - 4) + (3 - 1)


# ----------------------------------------------------------------------------------------- DISFA

def test_disfa_threshold_intensities_and_protocols(tmp_path):
    twelve = [int(a[2:]) for a in DATASET_AUS["disfa12"]]
    data = {a: [0, 0, 0] for a in twelve}
    data[1] = [1, 2, 5]  # 1 is below the >= 2 threshold
    data[26] = [0, 3, 1]
    data[15] = [4, 4, 4]  # only in the 12-AU variant
    write_disfa(tmp_path, "SN001", data)
    recs = read_disfa(tmp_path)
    assert [r.id for r in recs] == ["disfa/SN001/1", "disfa/SN001/2", "disfa/SN001/3"]
    assert [r.aus["AU1"] for r in recs] == [0, 1, 1]
    assert [r.aus["AU26"] for r in recs] == [0, 1, 0]
    assert set(recs[0].aus) == set(DATASET_AUS["disfa"])
    assert recs[1].intensities == {a: float(data[int(a[2:])][1]) for a in DATASET_AUS["disfa"]}
    assert [r.image for r in recs] == ["img/SN001/0.png", "img/SN001/1.png", "img/SN001/2.png"]
    assert recs[0].subject == "SN001"
    r12 = read_disfa(tmp_path, DISFAConfig(aus=list(DATASET_AUS["disfa12"])))
    assert set(r12[0].aus) == set(DATASET_AUS["disfa12"]) and r12[0].aus["AU15"] == 1
    assert read_disfa(tmp_path, DISFAConfig(occurrence_threshold=1))[0].aus["AU1"] == 1


def test_disfa_errors(tmp_path):
    data = {a: [0, 0] for a in (1, 2, 4, 6, 9, 12, 25, 26)}
    write_disfa(tmp_path, "SN002", data)
    au9 = tmp_path / "ActionUnit_Labels/SN002/SN002_au9.txt"
    au9.write_text("1,0\n3,0\n")
    with pytest.raises(ReaderError, match=re.escape(f"{au9}:2:") + ".*frame 3"):
        read_disfa(tmp_path)
    au9.write_text("1,0\n2;0\n")
    with pytest.raises(ReaderError, match=re.escape(f"{au9}:2:")):
        read_disfa(tmp_path)
    au9.write_text("1,0\n2,7\n")
    with pytest.raises(ReaderError, match=re.escape(f"{au9}:2:") + ".*0..5"):
        read_disfa(tmp_path)
    au9.unlink()
    with pytest.raises(ReaderError, match="SN002_au9.txt: missing"):
        read_disfa(tmp_path)


# ------------------------------------------------------------------------------------------- GFT

def test_gft_reads_assumed_table_layout(tmp_path):
    header = "frame," + ",".join(DATASET_AUS["gft"])  # "AU1" spelling also accepted
    rows = ["1," + ",".join("1" if a == "AU10" else "0" for a in DATASET_AUS["gft"]),
            "2," + ",".join("9" for _ in DATASET_AUS["gft"])]
    write_file(tmp_path / "labels/012A.csv", header + "\n" + "\n".join(rows) + "\n")
    recs = read_gft(tmp_path)
    assert len(recs) == 1 and recs[0].positive_aus == ["AU10"] and recs[0].subject == "012A"
    assert recs[0].image == "img/012A/1.jpg" and sum(recs.dropped.values()) == 1


# ---------------------------------------------------------------------------------------- RAF-AU

def test_rafau_drops_prefixes_and_outside_table_aus(tmp_path):
    path = write_file(tmp_path / "RAFAU_label.txt",
                      "0001.jpg 1+2+L4+R12\n0002.jpg null\n0003.jpg T22+B25+32+L12+R12\n0004.jpg AU26\n")
    recs = read_rafau(tmp_path)
    assert [r.id for r in recs] == ["rafau/0001", "rafau/0002", "rafau/0003", "rafau/0004"]
    assert recs[3].positive_aus == ["AU26"]
    assert recs[0].positive_aus == ["AU1", "AU2", "AU4", "AU12"]
    assert set(recs[0].aus) == set(AU_NAMES)  # FACS-coded: unlisted table AUs are absent (0)
    assert recs[1].positive_aus == []
    assert sorted(recs[2].positive_aus) == ["AU12", "AU22", "AU25"]
    assert recs[2].image == "aligned/0003_aligned.jpg"
    assert recs.dropped == {"rafau: AU32 is outside the FACS table of Exp-BLIP": 1}
    few = read_rafau(tmp_path, RAFAUConfig(aus=list(DATASET_AUS["rafau"])))
    assert "AU22" not in few[2].aus and few.dropped["rafau: AU22 present but not requested"] == 1
    path.write_text("0001.jpg 1+2\n0002.jpg 1+X5\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:2:") + ".*'X5'"):
        read_rafau(tmp_path)
    path.write_text("0001.jpg 1+2 extra\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:1:")):
        read_rafau(tmp_path)


# ------------------------------------------------------------------------------------- EmotioNet

def test_emotionet_urls_999_and_unknown_columns(tmp_path):
    path = write_file(tmp_path / "emotionet_manual.csv",
                      "URL,AU1,AU 2,AU12,AU45\n"
                      "http://a.b/x/img1.jpg,1,999,0,1\n"
                      "faces/img2.jpg,999,999,999,0\n"
                      "faces/img3.jpg,0,1,1,0\n")
    recs = read_emotionet(tmp_path, EmotioNetConfig(aus=["AU1", "AU2", "AU12"]))
    assert [r.image for r in recs] == ["images/img1.jpg", "faces/img3.jpg"]
    assert recs[0].aus == {"AU1": 1, "AU12": 0}  # 999 = not annotated
    assert recs[0].meta == {"url": "http://a.b/x/img1.jpg"}
    assert recs[1].aus == {"AU1": 0, "AU2": 1, "AU12": 1}
    assert sum(recs.dropped.values()) == 1  # the all-999 row
    with pytest.raises(ReaderError, match="AU45"):  # every column read: AU45 is not in the table
        read_emotionet(tmp_path, EmotioNetConfig(aus=None))
    path.write_text("image,AU1\nfaces/a.jpg,5\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:2:")):
        read_emotionet(tmp_path, EmotioNetConfig(aus=["AU1"]))


# ------------------------------------------------------------------------------------- AffectNet

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                    "expression,valence,arousal")


def _affectnet_row(name, expression):
    return f"{name},10,20,100,110,1.0;2.0;3.0,{expression},0.5,-0.25"


def test_affectnet_expressions_and_counted_drops(tmp_path, caplog):
    lists = tmp_path / "Manually_Annotated_file_lists"
    write_file(lists / "training.csv", AFFECTNET_HEADER + "\n" + "\n".join(
        _affectnet_row(f"1/{i}.jpg", i) for i in range(11)) + "\n")
    write_file(lists / "validation.csv", AFFECTNET_HEADER + "\n" + _affectnet_row("2/a.jpg", 7) + "\n")
    with caplog.at_level("INFO", logger="expvl.synthesis.readers"):
        recs = read_affectnet(tmp_path)
    assert [r.emotion for r in recs] == ["neutral", "happiness", "sadness", "surprise", "fear",
                                         "disgust", "anger", "contempt", "contempt"]
    assert [r.split for r in recs] == ["train"] * 8 + ["test"]
    assert recs[0].image == "Manually_Annotated_Images/1/0.jpg" and recs[0].aus == {}
    assert recs[0].meta == {"face_box": [10, 20, 100, 110], "valence": 0.5, "arousal": -0.25}
    assert recs.dropped == {"affectnet: expression 8 (none)": 1, "affectnet: expression 9 (uncertain)": 1,
                            "affectnet: expression 10 (non-face)": 1}
    assert "left out 1 (affectnet: expression 9 (uncertain))" in caplog.text  # drops are logged
    bad = write_file(lists / "validation.csv", AFFECTNET_HEADER + "\n" + _affectnet_row("2/a.jpg", 11) + "\n")
    with pytest.raises(ReaderError, match=re.escape(f"{bad}:2:") + ".*0..10"):
        read_affectnet(tmp_path, AffectNetConfig(splits=["test"]))


# ---------------------------------------------------------------------------------------- RAF-DB

def test_rafdb_basic_and_compound(tmp_path):
    write_file(tmp_path / "basic/EmoLabel/list_patition_label.txt",
               "train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 7\n")
    basic = read_rafdb(tmp_path / "basic")
    assert [(r.id, r.split, r.emotion) for r in basic] == [
        ("rafdb/train_00001", "train", "sadness"), ("rafdb/train_00002", "train", "surprise"),
        ("rafdb/test_0001", "test", "neutral")]
    assert basic[0].image == "Image/aligned/train_00001_aligned.jpg"
    path = write_file(tmp_path / "compound/EmoLabel/list_patition_label.txt",
                      "train_0001.jpg 1\ntest_0001.jpg 11\n")
    comp = read_rafdb_compound(tmp_path / "compound")
    assert comp[0].emotion is None
    assert comp[0].meta == {"compound": "happily surprised", "emotions": ["happiness", "surprise"]}
    assert comp[1].meta["emotions"] == ["disgust", "surprise"] and comp[1].split == "test"
    path.write_text("train_0001.jpg 1\nval_0002.jpg 2\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:2:")):
        read_rafdb_compound(tmp_path / "compound")
    path.write_text("train_0001.jpg 12\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:1:") + ".*1..11"):
        read_rafdb_compound(tmp_path / "compound")


# ----------------------------------------------------------------------------------- generic CSV

def test_csv_generic_occurrence_intensity_and_errors(tmp_path):
    path = write_file(tmp_path / "labels.csv",
                      "image,AU1,AU02,12,emotion,subject\n"
                      "a.jpg,1,0,1,Happy,s1\n"
                      "b.jpg,0,,0,,s2\n")
    recs = read_csv_generic(tmp_path)
    assert recs[0].aus == {"AU1": 1, "AU2": 0, "AU12": 1} and recs[0].emotion == "happiness"
    assert recs[1].aus == {"AU1": 0, "AU12": 0} and recs[1].emotion is None  # empty = unannotated
    assert recs[0].subject == "s1" and recs[0].split == "all" and recs[0].intensities == {}
    path.write_text("image,AU1,AU12\na.jpg,1,3.5\nb.jpg,0,2\n")  # 3.5 -> the file holds intensities
    recs = read_csv_generic(tmp_path)
    assert recs[0].intensities == {"AU1": 1.0, "AU12": 3.5} and recs[0].aus == {"AU1": 0, "AU12": 1}
    assert recs[1].aus == {"AU1": 0, "AU12": 1}
    with pytest.raises(ReaderError, match=re.escape(f"{path}:2:") + ".*0 or 1"):
        read_csv_generic(tmp_path, CSVConfig(values="occurrence"))
    path.write_text("image,AU1,AU99\na.jpg,1,0\n")
    with pytest.raises(ReaderError, match="AU99"):
        read_csv_generic(tmp_path)
    path.write_text("image,AU1,emotion\na.jpg,1,smug\n")
    with pytest.raises(ReaderError, match=re.escape(f"{path}:2:") + ".*smug"):
        read_csv_generic(tmp_path)


# ----------------------------------------------------------------------------------------- folds

def test_literal_protocols_are_subject_exclusive():
    assert [len(f) for f in folds.BP4D_FOLDS.folds] == [14, 14, 13]
    assert [len(f) for f in folds.DISFA_FOLDS.folds] == [9, 9, 9]
    for protocol in (folds.BP4D_FOLDS, folds.DISFA_FOLDS):
        folds.check_folds(protocol)
        assert protocol.citation


def test_fold_files_round_trip_and_errors(tmp_path):
    path = tmp_path / "bp4d_folds.json"
    folds.write_folds(path, folds.BP4D_FOLDS)
    assert folds.read_folds(path) == folds.BP4D_FOLDS
    d = json.loads(path.read_text())
    d["folds"][1].append("F001")
    path.write_text(json.dumps(d))
    with pytest.raises(FoldError, match="'F001' appears in folds 1 and 2"):
        folds.read_folds(path)
    d = json.loads(path.read_text())
    d["folds"][1].remove("F001")
    d["folds"][2].append("F999")
    path.write_text(json.dumps(d))
    with pytest.raises(FoldError, match="unknown subject.*F999"):
        folds.read_folds(path)
    mine = folds.FoldProtocol("mine", [["a", "b"], ["c"]])
    folds.write_folds(path, mine)
    assert folds.read_folds(path, known_subjects={"a", "b", "c"}).folds == [["a", "b"], ["c"]]
    with pytest.raises(FoldError, match="unknown subject.*'c'"):
        folds.read_folds(path, known_subjects={"a", "b"})
    with pytest.raises(FoldError, match="twice in fold 1"):
        folds.write_folds(path, folds.FoldProtocol("mine", [["a", "a"]]))


def _subject_records(subjects, per=2):
    return [Record(id=f"x/{s}/{i}", image=f"{s}/{i}.jpg", source="x", split="all", subject=s,
                   aus={"AU1": i % 2}) for s in subjects for i in range(per)]


def test_split_by_fold_is_subject_exclusive():
    subjects = [s for fold in folds.DISFA_FOLDS.folds for s in fold]
    recs = _subject_records(subjects)
    for k in (1, 2, 3):
        split = folds.split_by_fold(recs, folds.DISFA_FOLDS, test_fold=k)
        test_subjects = {r.subject for r in split.test}
        assert test_subjects == set(folds.DISFA_FOLDS.folds[k - 1])
        assert not test_subjects & {r.subject for r in split.train}
        assert len(split.train) + len(split.test) == len(recs)
        assert {r.split for r in split.test} == {"test"} and {r.split for r in split.train} == {"train"}
    assert recs[0].split == "all"  # inputs are not mutated
    with pytest.raises(FoldError, match="SN999"):
        folds.split_by_fold(recs + _subject_records(["SN999"]), folds.DISFA_FOLDS, test_fold=1)
    with pytest.raises(FoldError, match="test_fold"):
        folds.split_by_fold(recs, folds.DISFA_FOLDS, test_fold=4)
    by_subject = folds.split_by_subjects(recs, ["SN001"])
    assert {r.subject for r in by_subject.test} == {"SN001"} and len(by_subject.test) == 2
    with pytest.raises(FoldError, match="SN404"):
        folds.split_by_subjects(recs, ["SN404"])


def test_random_split_is_seeded():
    recs = _subject_records([f"s{i}" for i in range(50)], per=1)
    a, b = folds.random_split(recs, 0.2, seed=3), folds.random_split(recs, 0.2, seed=3)
    assert [r.id for r in a.test] == [r.id for r in b.test] and len(a.test) == 10
    assert {r.id for r in a.test} != {r.id for r in folds.random_split(recs, 0.2, seed=4).test}


def test_readers_table():
    assert READERS == {"bp4d": read_bp4d, "disfa": read_disfa, "gft": read_gft, "rafau": read_rafau,
                       "emotionet": read_emotionet, "affectnet": read_affectnet, "rafdb": read_rafdb,
                       "rafdb_compound": read_rafdb_compound, "csv": read_csv_generic}


def test_split_records_by_subject_seeded_and_order_independent(tmp_path):
    recs = _subject_records([f"s{i:02d}" for i in range(20)], per=3)
    cfg = folds.SplitConfig(test_fraction=0.2, val_fraction=0.1)
    a = folds.split_records(recs, cfg, seed=5)
    subjects = {name: {r.subject for r in part} for name, part in a.by_name().items()}
    assert [len(subjects[n]) for n in ("train", "val", "test")] == [14, 2, 4]
    assert sum(len(s) for s in subjects.values()) == 20  # no subject in two splits
    assert all(r.split == name for name, part in a.by_name().items() for r in part)
    b = folds.split_records(list(reversed(recs)), cfg, seed=5)  # record order does not matter
    assert {n: {r.subject for r in p} for n, p in b.by_name().items()} == subjects
    c = folds.split_records(recs, cfg, seed=6)
    assert {r.subject for r in c.test} != subjects["test"]
    # a fold (here of a fold file) is held out as test; val is drawn from the other subjects
    path = tmp_path / "folds.json"
    folds.write_folds(path, folds.FoldProtocol("mine", [[f"s{i:02d}" for i in range(k, 20, 4)] for k in range(4)]))
    e = folds.split_records(recs, folds.SplitConfig(fold_protocol=str(path), test_fold=2, val_fraction=0.1))
    assert {r.subject for r in e.test} == {"s01", "s05", "s09", "s13", "s17"}
    assert len({r.subject for r in e.val}) == 2 and not {r.subject for r in e.val} & {r.subject for r in e.test}
    with pytest.raises(FoldError, match="both test and val"):
        folds.split_by_subjects(recs, ["s01"], ["s01"])
    with pytest.raises(FoldError, match="none for train"):
        folds.split_records(_subject_records(["a", "b"]), folds.SplitConfig(test_fraction=0.5, val_fraction=0.4))
    with pytest.raises(FoldError, match="without a subject"):
        folds.split_records(recs + [Record(id="x/none", image="n.jpg", source="x", split="all")], cfg)


def test_split_records_by_image_without_subjects():
    recs = [Record(id=f"x/{i}", image=f"{i}.jpg", source="x", split="all", aus={"AU1": i % 2}) for i in range(40)]
    split = folds.split_records(recs, folds.SplitConfig(test_fraction=0.25, val_fraction=0.1), seed=1)
    assert (len(split.train), len(split.val), len(split.test)) == (26, 4, 10)
    assert split.test == folds.random_split(recs, 0.25, seed=1).test  # the test draw of random_split
    with pytest.raises(FoldError, match="needs records with subjects"):
        folds.split_records(recs, folds.SplitConfig(fold_protocol="bp4d", test_fold=1))



@pytest.mark.parametrize("reader,file,says", [
    (read_rafau, "RAFAU_label.txt", "RAF-AU label file not found"),
    (read_rafdb, "EmoLabel/list_patition_label.txt", "RAF-DB label list not found")])
def test_a_missing_label_file_is_named(tmp_path, reader, file, says):
    with pytest.raises(ReaderError, match=re.escape(f"{tmp_path / file}: {says}")):
        reader(tmp_path)


def test_blank_lines_and_a_byte_order_mark_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "RAFAU_label.txt"
    path.write_bytes("\ufeff0001.jpg 1+2\n\n   \n0002.jpg 4 extra\n".encode())
    with pytest.raises(ReaderError, match=re.escape(f"{path}:4: expected '<image> <AU string>'")):
        read_rafau(tmp_path)
    path.write_bytes("\ufeff0001.jpg 1+2\n\n0002.jpg 4\n".encode())
    assert [r.id for r in read_rafau(tmp_path)] == ["rafau/0001", "rafau/0002"]
