import json
from pathlib import Path

import pytest
import torch

from medkd.catalog.dataset_specs import DataError
from medkd.catalog.synthetic import make_synthetic_medpix, make_synthetic_wound
from medkd.data.prepared import DataConfig, PreparedData, load_splits, make_loader
from medkd.models.backbones import build_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_MEDPIX = SHARED / "medpix-2.0"
REAL_WOUND = SHARED / "wound-1-0"


@pytest.fixture
def medpix(tmp_path):
    return make_synthetic_medpix(tmp_path / "medpix", sizes=(20, 8, 8), image_size=24)


@pytest.fixture
def wound(tmp_path):
    return make_synthetic_wound(tmp_path / "wound", sizes=(24, 8, 8), image_size=24)


def test_synthetic_medpix_in_published_layout(medpix):
    assert (medpix / "Descriptions.json").exists()
    data = PreparedData.load(DataConfig("medpix", str(medpix), image_size=16, max_length=24))
    assert [len(data.records[s]) for s in ("train", "dev", "test")] == [20, 8, 8]
    assert data.vocab.tasks == ("modality", "location")
    assert data.vocab.classes[0] == ("CT", "MR") and data.vocab.num_classes == (2, 5)
    first = json.loads((medpix / "splitted_dataset" / "descriptions_train.jsonl").read_text().splitlines()[0])
    assert data.records["train"][0].text == first["Description"]["Caption"]
    assert data.labels["train"][0].tolist() == [data.vocab.classes[0].index(first["Type"]),
                                                data.vocab.classes[1].index(first["Location Category"])]


def test_batches_hold_the_study_keys_and_trimmed_tokens(medpix):
    data = PreparedData.load(DataConfig("medpix", str(medpix), image_size=16, max_length=64))
    tok = build_tokenizer("tiny-bert")
    dataset = data.dataset("train", {"teacher": tok, "student": tok})
    batch = next(iter(make_loader(dataset, 4, shuffle=True, seed=1)))
    assert set(batch) == {"pixel_values", "input_ids_teacher", "attention_mask_teacher", "input_ids_student",
                          "attention_mask_student", "labels", "index"}
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert 0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    # Grayscale PNGs come out as three equal channels (RGB); the model normalises, not the data.
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 1])
    mask = batch["attention_mask_student"]
    assert mask.shape[1] == int(mask.sum(1).max()) < 64  # shared padding trimmed
    full = tok([data.records["train"][int(i)].text for i in batch["index"]], padding="max_length",
               max_length=64, truncation=True, return_tensors="pt")
    torch.testing.assert_close(batch["input_ids_student"], full["input_ids"][:, :mask.shape[1]])
    assert torch.equal(batch["labels"], data.labels["train"][batch["index"]])


def test_same_seed_same_batch_order(medpix):
    data = PreparedData.load(DataConfig("medpix", str(medpix), image_size=16, max_length=16))
    dataset = data.dataset("train", {"student": build_tokenizer("tiny-bert")})
    order = lambda seed: [b["index"].tolist() for b in make_loader(dataset, 4, True, seed)]  # noqa: E731
    assert order(3) == order(3) and order(3) != order(4)


def test_synthetic_wound_with_configured_columns(wound):
    for split in ("train", "dev", "test"):
        path = wound / f"metadata_{split}.csv"
        path.write_text(path.read_text().replace("img_path,type,severity,", "img_path,wound_type,grade,", 1))
    cfg = DataConfig("wound", str(wound), label_fields=("wound_type", "grade"), image_size=16)
    data = PreparedData.load(cfg)
    assert data.vocab.tasks == ("type", "severity")  # task names come from the data set's spec
    assert data.vocab.num_classes == (4, 3)
    with pytest.raises(DataError, match=r"metadata_train.csv: missing column\(s\) \['type', 'severity'\]"):
        load_splits(DataConfig("wound", str(wound)))


@pytest.mark.parametrize("field", ["Modality", "Type", "Location", "Location Category"])
def test_leakage_guard_refuses_label_fields(medpix, field):
    # Refused when the config is built: before any file is read.
    with pytest.raises(ValueError, match=f"text field '{field}' leaks a label"):
        DataConfig("medpix", str(medpix), text_fields=("Caption", field))


def test_leakage_guard_wound(wound):
    with pytest.raises(ValueError, match="label column"):
        DataConfig("wound", str(wound), text_fields=("severity",))


def test_other_text_fields_are_joined(medpix):
    records = load_splits(DataConfig("medpix", str(medpix), text_fields=("Plane", "Caption")))
    assert records["train"][0].text.startswith("Plane: Axial. Caption: ")


def test_unseen_label_in_dev_is_an_error(medpix):
    path = medpix / "splitted_dataset" / "descriptions_dev.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["Location Category"] = "Extremities"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"dev record '{rows[2]['image']}': location label 'Extremities' never occurs"):
        PreparedData.load(DataConfig("medpix", str(medpix)))


def test_missing_image_names_file_and_record(medpix):
    first = json.loads((medpix / "splitted_dataset" / "descriptions_test.jsonl").read_text().splitlines()[0])
    (medpix / "images" / f"{first['image']}.png").unlink()
    with pytest.raises(DataError, match=rf"missing image .*{first['image']}.png for test record '{first['image']}'"):
        PreparedData.load(DataConfig("medpix", str(medpix)))


def test_unreadable_image_names_file(medpix):
    data = PreparedData.load(DataConfig("medpix", str(medpix), image_size=16))
    data.records["dev"][1].image_path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"unreadable image .*{data.records['dev'][1].image_id}"):
        data.images("dev")


def test_empty_text_and_missing_field_are_errors(medpix):
    path = medpix / "splitted_dataset" / "descriptions_train.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[3])
    row["Description"]["Caption"] = "  "
    path.write_text("\n".join(lines[:3] + [json.dumps(row)] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=rf"descriptions_train.jsonl, line 4 \(image '{row['image']}'\): empty text"):
        load_splits(DataConfig("medpix", str(medpix)))
    del row["Type"]
    path.write_text("\n".join(lines[:3] + [json.dumps(row)] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"line 4: record has no field 'Type'"):
        load_splits(DataConfig("medpix", str(medpix)))


def test_missing_data_set_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig("medpix", str(tmp_path / "nowhere")))


@pytest.mark.skipif(not REAL_MEDPIX.exists(), reason=f"real MedPix-2.0 copy not at {REAL_MEDPIX}")
def test_real_medpix_splits_are_case_disjoint_and_complete():
    data = PreparedData.load(DataConfig("medpix", str(REAL_MEDPIX), image_size=32))
    assert [len(data.records[s]) for s in ("train", "dev", "test")] == [1653, 197, 200]
    assert data.vocab.classes == (("CT", "MR"), ("Abdomen", "Head", "Reproductive and Urinary System",
                                                 "Spine and Muscles", "Thorax"))
    cases = {s: {r.image_id.split("_")[0] for r in data.records[s]} for s in data.records}
    assert not (cases["train"] & cases["dev"]) and not (cases["train"] & cases["test"])
    assert not (cases["dev"] & cases["test"])
    images = data.images("dev")
    assert images.shape == (197, 3, 32, 32) and images.dtype == torch.uint8


@pytest.mark.skipif(not REAL_WOUND.exists(), reason=f"real Wound-1-0 metadata not at {REAL_WOUND}")
def test_real_wound_metadata_without_images():
    records = load_splits(DataConfig("wound", str(REAL_WOUND)))
    assert [len(records[s]) for s in ("train", "dev", "test")] == [1094, 235, 235]
    assert len({r.labels[0] for r in records["train"]}) == 10
    assert {r.labels[1] for r in records["train"]} == {"Mild", "Moderate", "Severe"}
    assert all(r.text for r in records["test"])
    # The images are not on this machine: loading for training says which one is missing.
    with pytest.raises(DataError, match=r"missing image .*images/\w+\.png for train record"):
        PreparedData.load(DataConfig("wound", str(REAL_WOUND)))


# --------------------------------------------------------------------------- checked whole


def test_verify_lists_every_truncated_or_unreadable_image(medpix):
    from medkd.data.prepared import verify_files
    records = load_splits(DataConfig("medpix", str(medpix)))
    truncated, garbage = records["train"][2], records["test"][1]
    data = truncated.image_path.read_bytes()
    truncated.image_path.write_bytes(data[: len(data) // 2])  # a valid header, cut short
    garbage.image_path.write_bytes(b"not a png")
    # The plain loader opens the first one fine: only a full decode finds it.
    from PIL import Image
    with Image.open(truncated.image_path) as img:
        assert img.size
    with pytest.raises(DataError, match="2 problem") as err:
        verify_files(records)
    message = str(err.value)
    assert f"unreadable image {truncated.image_path} (train record '{truncated.image_id}')" in message
    assert f"unreadable image {garbage.image_path} (test record '{garbage.image_id}')" in message


def test_verify_refuses_duplicate_ids_and_the_same_image_in_two_splits(medpix):
    import shutil

    from medkd.data.prepared import verify_files
    records = load_splits(DataConfig("medpix", str(medpix)))
    hashes = verify_files(records)
    assert [len(h) for h in hashes.values()] == [20, 8, 8] and len({h for v in hashes.values() for h in v}) == 36
    train, test = records["train"][0], records["test"][3]
    shutil.copy(train.image_path, test.image_path)  # a training image reappears as a test image
    records["dev"].append(records["train"][5])  # the same id in two splits
    with pytest.raises(DataError) as err:
        verify_files(records)
    message = str(err.value)
    assert "identical images (sha256 " in message
    assert f"train record '{train.image_id}' and test record '{test.image_id}'" in message
    dup = records["train"][5].image_id
    assert f"duplicate image id '{dup}': train record '{dup}' and dev record '{dup}'" in message


def _rewrite_csv_line(path, line_no, change):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = change(lines[line_no - 1])
    path.write_text("\n".join(lines) + "\n")


def test_wound_rows_with_too_many_or_too_few_fields_are_refused(wound):
    path = wound / "metadata_train.csv"
    # An unquoted comma inside the description: today's readers silently cut the text.
    _rewrite_csv_line(path, 3, lambda line: line + ", and more text")
    _rewrite_csv_line(path, 5, lambda line: ",".join(line.split(",")[:3]))  # the description is missing
    with pytest.raises(DataError, match=r"metadata_train.csv: 2 malformed row\(s\)") as err:
        load_splits(DataConfig("wound", str(wound)))
    message = str(err.value)
    assert "row 3 (" in message and "5 fields, expected 4 (an unquoted comma in the text?)" in message
    assert "row 5 (" in message and "3 fields, expected 4" in message


def test_length_bucketed_training_batches_cover_each_sample_once_and_pad_less():
    from medkd.data.prepared import LengthBucketBatchSampler
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 48, (203,))
    sampler = LengthBucketBatchSampler(lengths, batch_size=8, generator=generator, pool_batches=4)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 26  # ceil(203 / 8), as with plain shuffling
        assert sorted(i for b in batches for i in b) == list(range(203))
        assert sum(len(b) < 8 for b in batches) == 1  # only the last pool's tail is short
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    # Tokens a batch pads to, summed: bucketed pools against the same samples in plain random batches.
    padded = lambda batches: sum(len(b) * int(lengths[b].max()) for b in batches)  # noqa: E731
    plain = torch.randperm(203, generator=torch.Generator().manual_seed(5)).split(8)
    assert padded(epochs[0]) < 0.85 * padded([b.tolist() for b in plain])
    again = LengthBucketBatchSampler(lengths, 8, torch.Generator().manual_seed(5), pool_batches=4)
    assert list(again) == epochs[0]  # the generator is the only source of randomness


def test_length_bucketed_loader_draws_from_the_loader_generator(medpix):
    """A resumed run restores `loader.generator`; the bucketed order must follow it."""
    data = PreparedData.load(DataConfig("medpix", str(medpix), image_size=16, max_length=16))
    dataset = data.dataset("train", {"student": build_tokenizer("tiny-bert")})
    loader = make_loader(dataset, 4, shuffle=True, seed=3, by_length=True)
    state = loader.generator.get_state()
    first = [b["index"].tolist() for b in loader]
    loader.generator.set_state(state)
    assert [b["index"].tolist() for b in loader] == first
    assert sorted(i for b in first for i in b) == list(range(len(dataset)))


def test_masking_replaces_exactly_the_listed_words():
    from medkd.data.prepared import mask_words
    terms = ["CT", "MR", "MRI", "T2", "computed tomography", "diffusion-weighted"]
    texts = ["Axial CT shows a mass; MRI and ct confirm.",
             "T2-weighted MR image, no CTA, ACT or MRIs here; T2.",
             "Computed\n  Tomography and diffusion-weighted imaging; computed tomographies stay."]
    assert mask_words(texts, terms, "[MASK]") == [
        "Axial [MASK] shows a mass; [MASK] and [MASK] confirm.",  # any case; MRI is one word, not MR + I
        "[MASK]-weighted [MASK] image, no CTA, ACT or MRIs here; [MASK].",  # whole words only
        "[MASK] and [MASK] imaging; computed tomographies stay."]  # phrases across any whitespace
    assert mask_words(texts, [], "[MASK]") == texts


def test_masked_data_shows_each_tokenizer_its_mask_token_in_every_split(medpix):
    from medkd.data.prepared import DataConfig
    tokenizer = build_tokenizer("tiny-bert")
    plain = PreparedData.load(DataConfig(name="medpix", root=str(medpix), image_size=16, max_length=24))
    masked = PreparedData.load(DataConfig(name="medpix", root=str(medpix), image_size=16, max_length=24,
                                          mask_terms=("head", "abdomen")))
    assert masked.content_key("train") != plain.content_key("train")  # caches and resumes never mix them
    for split in ("train", "dev", "test"):
        ids, _ = masked.dataset(split, {"student": tokenizer}).tokens["student"]
        plain_ids, _ = plain.dataset(split, {"student": tokenizer}).tokens["student"]
        words = [r.text.lower() for r in masked.records[split]]
        has_term = torch.tensor([("head" in w.split() or "abdomen" in w.split()) for w in words])
        masked_rows = (ids == tokenizer.mask_token_id).any(1)
        assert has_term.any() and torch.equal(masked_rows, has_term), split
        assert torch.equal(ids[~has_term], plain_ids[~has_term])  # texts without the words are untouched
    with pytest.raises(ValueError, match="mask_terms"):
        DataConfig(name="medpix", root=str(medpix), mask_terms=("ct", " "))
