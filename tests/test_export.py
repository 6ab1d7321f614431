"""Export never destroys what it did not write: the --out guard and the atomic replace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachelora import export
from cachelora.errors import CacheloraError
from cachelora.records import file_sha256, write_json


def fake_export(folder: Path, files: dict[str, str]) -> None:
    """A folder shaped like a previous export: its files and a cache_config.json listing their checksums."""
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    write_json(folder / export.CACHE_CONFIG, {"checksums": {n: file_sha256(folder / n) for n in files}})


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_new_and_empty_targets_are_accepted(in_tmp: Path) -> None:
    export.check_export_target(in_tmp / "new")
    (in_tmp / "empty").mkdir()
    export.check_export_target(in_tmp / "empty")


@pytest.mark.parametrize("out", [".", "..", "work"])
def test_the_working_directory_and_its_parents_are_refused(in_tmp: Path, out: str, monkeypatch) -> None:
    (in_tmp / "work").mkdir()
    (in_tmp / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(in_tmp / "work")
    target = Path(out) if out != "work" else in_tmp / "work"
    with pytest.raises(CacheloraError, match="working directory"):
        export.check_export_target(target, force=True)
    assert (in_tmp / "work" / "notes.txt").read_text() == "mine"


def test_a_folder_with_other_files_is_refused_even_with_force(in_tmp: Path) -> None:
    (in_tmp / "models").mkdir()
    (in_tmp / "models" / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(CacheloraError, match="not a cachelora export"):
            export.check_export_target(in_tmp / "models", force=force)
    fake_export(in_tmp / "old", {"model.safetensors": "w"})
    (in_tmp / "old" / "notes.txt").write_text("mine")
    with pytest.raises(CacheloraError, match=r"notes\.txt: not written by an export"):
        export.check_export_target(in_tmp / "old", force=True)


def test_a_previous_export_is_replaced_and_an_edited_one_only_with_force(in_tmp: Path) -> None:
    fake_export(in_tmp / "old", {"model.safetensors": "w", "1_Pooling/config.json": "{}"})
    export.check_export_target(in_tmp / "old")
    (in_tmp / "old" / "model.safetensors").write_text("edited")
    with pytest.raises(CacheloraError, match="edited since it was exported; --force"):
        export.check_export_target(in_tmp / "old")
    export.check_export_target(in_tmp / "old", force=True)


def test_a_file_or_a_symlink_is_refused(in_tmp: Path) -> None:
    (in_tmp / "file").write_text("x")
    with pytest.raises(CacheloraError, match="not a directory"):
        export.check_export_target(in_tmp / "file")
    (in_tmp / "real").mkdir()
    os.symlink(in_tmp / "real", in_tmp / "link")
    with pytest.raises(CacheloraError, match="symlink"):
        export.check_export_target(in_tmp / "link", force=True)
    fake_export(in_tmp / "withlink", {"model.safetensors": "w"})
    os.symlink(in_tmp / "real", in_tmp / "withlink" / "escape")
    with pytest.raises(CacheloraError, match="escape: not written by an export"):
        export.check_export_target(in_tmp / "withlink", force=True)


class SavesOneFile:
    """A stand-in serving model: save() writes one weights file."""

    max_seq_length = 48

    def __iter__(self):
        return iter(())

    def get_embedding_dimension(self) -> int:
        return 384

    def save(self, folder: str) -> None:
        (Path(folder) / "model.safetensors").write_text("weights")


def test_export_model_leaves_a_folder_of_other_files_as_it_was(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through export_model, not only the guard: --out models (trained adapters, notes) is refused, untouched."""
    (in_tmp / "models" / "medical").mkdir(parents=True)
    (in_tmp / "models" / "medical" / "adapter_model.safetensors").write_text("trained")
    (in_tmp / "models" / "notes.txt").write_text("mine")
    monkeypatch.setattr(export, "_load", lambda name: (SavesOneFile(), {}, None))
    monkeypatch.setattr(export, "shipped_thresholds", lambda metrics, name: {"global": {"threshold": 0.9}})
    monkeypatch.setattr(export, "semantic_router_snippet", lambda name, thresholds: "")
    write_json(in_tmp / "eval.json", {"deploy": {"model": "multi"}})
    with pytest.raises(CacheloraError, match="not a cachelora export"):
        export.export_model(None, in_tmp / "models", eval_path=in_tmp / "eval.json")
    assert (in_tmp / "models" / "notes.txt").read_text() == "mine"
    assert (in_tmp / "models" / "medical" / "adapter_model.safetensors").read_text() == "trained"
    assert sorted(p.name for p in in_tmp.iterdir()) == ["eval.json", "models"]


def test_a_failed_write_keeps_the_previous_export(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-write: one-line error, the old export intact, no temp left beside it."""
    fake_export(in_tmp / "out", {"model.safetensors": "old weights"})
    before = {p: p.read_bytes() for p in (in_tmp / "out").rglob("*") if p.is_file()}

    class FullDisk:
        def save(self, folder: str) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_load", lambda name: (FullDisk(), {}, None))
    monkeypatch.setattr(export, "shipped_thresholds", lambda metrics, name: {"global": {"threshold": 0.9}})
    write_json(in_tmp / "eval.json", {"deploy": {"model": "multi"}})
    with pytest.raises(CacheloraError, match="No space left on device"):
        export.export_model(None, in_tmp / "out", eval_path=in_tmp / "eval.json")
    assert {p: p.read_bytes() for p in (in_tmp / "out").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in in_tmp.iterdir()) == ["eval.json", "out"]


TRAFFIC = {
    "target_precision": 0.95,
    "near_miss_share": 0.1,
    "rival_window": 0.02,
    "cost": {"lookup_over_embedding": 1.8},
    "shipped": {
        "model": "multi",
        "chosen_on": "traffic dev",
        "settings": {
            "law": {"threshold": 0.55, "verifier_threshold": 0.7},
            "all": {"threshold": 0.6, "verifier_threshold": 0.75},
        },
        "dev": {"all": {"reask_hit_rate": 0.6}},
        "test": {"all": {"reask_hit_rate": 0.5, "near_miss_wrong_hit_rate": 0.01, "hit_precision": 0.96}},
    },
}


def test_the_verifier_ships_beside_the_model_it_was_calibrated_with(in_tmp: Path, monkeypatch) -> None:
    block = export.verifier_settings(TRAFFIC, "multi")
    assert block["path"] == export.VERIFIER_DIR and block["threshold"] == 0.75
    assert block["per_domain"] == {"law": 0.7} and block["embedding_per_domain"] == {"law": 0.55}
    assert block["traffic_test"] == TRAFFIC["shipped"]["test"]
    assert block["rival_window"] == 0.02 and "more than 0.02 below the nearest's" in block["rule"]
    assert export.verifier_settings(TRAFFIC, "merged") is None  # calibrated with another embedding model
    assert export.verifier_settings(None, "multi") is None

    verifier = in_tmp / "trained_verifier"
    verifier.mkdir()
    (verifier / "config.json").write_text("{}")
    monkeypatch.setattr("cachelora.verifier_model.verifier_dir", lambda: verifier)
    monkeypatch.setattr(export, "_load", lambda name: (SavesOneFile(), {}, None))
    monkeypatch.setattr(export, "shipped_thresholds", lambda metrics, name: {"global": {"threshold": 0.9}})
    monkeypatch.setattr(export, "semantic_router_snippet", lambda name, thresholds: "")
    write_json(in_tmp / "eval.json", {"deploy": {"model": "multi"}})
    write_json(in_tmp / "traffic.json", TRAFFIC)
    config = export.export_model(None, in_tmp / "out", eval_path=in_tmp / "eval.json")
    assert (in_tmp / "out" / "verifier" / "config.json").read_text() == "{}"
    assert config["verifier"]["per_domain"] == {"law": 0.7} and "verifier/config.json" in config["checksums"]
    card = (in_tmp / "out" / "README.md").read_text()
    assert "re-ask hit rate 0.500, near-miss wrong-hit rate 0.010, hit precision 0.960" in card
    export.check_export_target(in_tmp / "out")  # a later export may replace it


def test_the_exported_directory_read_as_the_router_reads_it_gives_evaluates_vectors(
    in_tmp: Path, monkeypatch, tiny_adapter: Path
) -> None:
    """tokenizers' tokenizer.json + transformers' AutoModel, mean pooling, L2 (what candle's BERT path does),
    on a query far longer than the tokenizer's old 128-token limit and on a short one, equal evaluate's
    vectors (the served model at its max_seq_length) to 1e-5, with the attention mask or without."""
    import shutil

    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from cachelora.adapters import load_served_model

    shutil.copytree(tiny_adapter, in_tmp / "models" / "medical")
    monkeypatch.setattr(export, "shipped_thresholds", lambda metrics, name: {"global": {"threshold": 0.9}})
    monkeypatch.setattr(export, "semantic_router_snippet", lambda name, thresholds: "")
    write_json(in_tmp / "eval.json", {"deploy": {"model": "medical"}})
    config = export.export_model(None, in_tmp / "out", eval_path=in_tmp / "eval.json")
    served = load_served_model(in_tmp / "models" / "medical")
    assert config["max_seq_length"] == served.max_seq_length
    card = (in_tmp / "out" / "README.md").read_text()  # ours, not the base model's upstream card
    assert card.startswith("# cachelora export: `medical`") and f"truncated at {served.max_seq_length} tokens" in card
    assert config["checksums"]["README.md"] == file_sha256(in_tmp / "out" / "README.md")
    queries = ["is ibuprofen safe after a tooth extraction", " ".join(["my knee hurts when I climb stairs"] * 30)]
    tokenizer = Tokenizer.from_file(str(in_tmp / "out" / "tokenizer.json"))
    assert len(tokenizer.encode(queries[1]).ids) == served.max_seq_length < 128
    model = AutoModel.from_pretrained(str(in_tmp / "out")).eval()
    for query in queries:
        encoding = tokenizer.encode(query)
        ids = torch.tensor([encoding.ids])
        mask = torch.tensor([encoding.attention_mask])
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
        masked = (hidden * mask[0, :, None]).sum(0) / mask.sum()
        for pooled in (masked, hidden.mean(0)):  # no padding: a reader without the mask gets the same
            vector = torch.nn.functional.normalize(pooled, dim=0).numpy()
            expected = served.encode([query], normalize_embeddings=True)[0]
            np.testing.assert_allclose(vector, expected, atol=1e-5)


def test_the_router_comment_says_why_a_threshold_is_not_certified_and_how_close_it_came() -> None:
    best = {"threshold": 0.822, "right_hits": 95, "hits": 114, "precision_lower_bound": 0.765}
    nothing = {"threshold": 0.998, "right_hits": 0, "hits": 0, "precision_lower_bound": 0.0, "certified": False}
    pooled = export.guarantee({**nothing, "best": best}, 0.95)
    assert "NOT certified" in pooled and "precision >= 0.765 at 0.822 (95/114 right)" in pooled
    alone = export.guarantee({**nothing, "fallback": "all", "best": best}, 0.95)
    assert "not certified alone: the pooled threshold" in alone and "0.765 at 0.822" in alone
    assert "too few" not in alone  # hundreds of lookups: the reason is wrong hits, not a small sample
    certified = {"threshold": 0.7, "right_hits": 150, "hits": 153, "precision_lower_bound": 0.95, "certified": True}
    assert export.guarantee(certified, 0.95) == "150/153 hits right: precision >= 0.950 at 95% confidence"
