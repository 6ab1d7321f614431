import pytest
import torch

from cachelora import paths
from cachelora.base_model import encode_unique, load_base
from cachelora.distillation import distillation_loss, embed_domain, load_teacher, similarity_matrix, teacher_file
from cachelora.errors import CacheloraError
from cachelora.records import write_jsonl
from cachelora.training import train_model
from cachelora.triplets import TEXT_FIELDS
from tests.conftest import tiny_model_params, tiny_rows

TEACHER = "all-MiniLM-L6-v2"  # any sentence-transformers model teaches; the small one keeps the test fast


def distilled_params(weight: float = 1.0, **train: object):
    params = tiny_model_params(**train)
    distill = params.train.distill.model_copy(update={"teacher": TEACHER, "weight": weight})
    return params.model_copy(update={"train": params.train.model_copy(update={"distill": distill})})


@pytest.fixture
def split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = tiny_rows(24)
    write_jsonl(paths.split_file("medical", "train"), rows)
    return rows


def test_the_teacher_embeds_every_train_text_once_and_reads_back(split):
    count = embed_domain(distilled_params(), "medical", teacher_file("medical"))
    texts = {row[f] for row in split for f in TEXT_FIELDS}
    assert count == len(texts)
    vectors = load_teacher([teacher_file("medical")], TEACHER)
    expected = encode_unique(load_base(TEACHER), sorted(texts))
    assert set(vectors) == texts
    assert all(torch.allclose(vectors[t], torch.from_numpy(expected[t]), atol=1e-5) for t in texts)


def test_vectors_of_another_teacher_or_none_are_refused(split, tmp_path):
    with pytest.raises(CacheloraError, match=r"teacher embeddings not found \(run `dvc repro teacher`\)"):
        load_teacher([teacher_file("medical")], TEACHER)
    embed_domain(distilled_params(), "medical", teacher_file("medical"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not the same weights")
    with pytest.raises(CacheloraError, match=r"medical.safetensors: embedded by another teacher"):
        load_teacher([teacher_file("medical")], str(other))


def test_the_loss_is_zero_on_the_teachers_own_geometry_and_pulls_towards_it():
    torch.manual_seed(0)
    teacher = {f"t{i}": torch.nn.functional.normalize(torch.randn(8), dim=0) for i in range(6)}
    texts = [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    same = [torch.stack([teacher[t] for t in column]) for column in texts]
    assert float(distillation_loss(same, texts, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = [torch.randn(2, 8, requires_grad=True) for _ in texts]
    loss = distillation_loss(student, texts, teacher)
    loss.backward()
    assert float(loss) > 0 and all(float(s.grad.abs().sum()) > 0 for s in student)
    assert similarity_matrix(same).shape == (2, 6)
    with pytest.raises(CacheloraError, match=r"no teacher vector for training text 'x'"):
        distillation_loss(student, [["x", "t1"], *texts[1:]], teacher)


def test_training_with_a_teacher_moves_the_students_similarities_towards_it(split):
    """What reaches the loss: the teacher term changes the trained adapter, towards the teacher."""
    embed_domain(distilled_params(), "medical", teacher_file("medical"))
    teacher = load_teacher([teacher_file("medical")], TEACHER)
    # A teacher whose geometry differs from the student's start: every cosine pulled towards one vector.
    shift = torch.nn.functional.normalize(torch.ones(384), dim=0)
    teacher = {t: torch.nn.functional.normalize(v + 2 * shift, dim=0) for t, v in teacher.items()}
    files = [paths.split_file("medical", "train")]
    texts = [[row[f] for row in split[:8]] for f in TEXT_FIELDS]
    target = similarity_matrix([torch.stack([teacher[t] for t in column]) for column in texts])

    def gap(weight: float) -> float:
        trained = train_model("medical", distilled_params(weight, epochs=2, lr=5e-3), files, teacher)
        trained.model.eval()
        with torch.no_grad():
            student = [trained.model.encode(column, convert_to_tensor=True) for column in texts]
        return float(torch.mean((similarity_matrix(student) - target) ** 2))

    assert gap(5.0) < 0.5 * gap(0.0)


def test_with_distillation_off_the_teacher_embeds_nothing(split, monkeypatch):
    import cachelora.distillation as distillation

    monkeypatch.setattr(distillation, "load_base", lambda *a, **k: pytest.fail("the teacher was loaded"))
    assert embed_domain(distilled_params(weight=0.0), "medical", teacher_file("medical")) == 0
    assert load_teacher([teacher_file("medical")], TEACHER) == {}
