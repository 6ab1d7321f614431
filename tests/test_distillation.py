from pathlib import Path

import pytest
import torch

from cachelora import paths
from cachelora.base_model import encode_unique, load_base
from cachelora.distillation import Distillation, embed_domain, load_teacher, row_scores, similarity_matrix, teacher_file
from cachelora.errors import CacheloraError
from cachelora.params import DistillParams
from cachelora.records import write_jsonl
from cachelora.training import train_model
from cachelora.triplets import TEXT_FIELDS
from tests.conftest import tiny_model_params, tiny_rows

TEACHER = "all-MiniLM-L6-v2"  # any sentence-transformers model teaches; the small one keeps the test fast


def distilled_params(weight: float = 1.0, loss: str = "matrix_mse", **train: object):
    params = tiny_model_params(**train)
    distill = params.train.distill.model_copy(update={"teacher": TEACHER, "weight": weight, "loss": loss})
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


LOSSES = ["matrix_mse", "margin_mse", "kl"]


@pytest.mark.parametrize("kind", LOSSES)
def test_the_loss_is_zero_on_the_teachers_own_geometry_and_pulls_towards_it(kind):
    torch.manual_seed(0)
    teacher = {f"t{i}": torch.nn.functional.normalize(torch.randn(8), dim=0) for i in range(6)}
    texts = [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    distillation = Distillation(DistillParams(weight=1.0, loss=kind), torch.nn.Identity(), teacher)
    same = [torch.stack([teacher[t] for t in column]) for column in texts]
    assert float(distillation(same, texts)) == pytest.approx(0.0, abs=1e-6)
    student = [torch.randn(2, 8, requires_grad=True) for _ in texts]
    loss = distillation(student, texts)
    loss.backward()
    assert float(loss) > 0 and all(float(s.grad.abs().sum()) > 0 for s in student)
    assert similarity_matrix(same).shape == (2, 6) and row_scores(same).shape == (2, 2)
    with pytest.raises(CacheloraError, match=r"no teacher vector for training text 'x'"):
        distillation(student, [["x", "t1"], *texts[1:]])


def test_the_row_losses_compare_each_rows_positive_and_negative_with_the_teachers():
    """margin_mse: the squared error of cos(a,p) - cos(a,n) against the teacher's; kl: the KL divergence
    of the softmax over each row's (positive, negative) at the temperature, scaled by its square."""
    torch.manual_seed(1)
    teacher = {f"t{i}": torch.nn.functional.normalize(torch.randn(8), dim=0) for i in range(6)}
    texts = [["t0", "t1"], ["t2", "t3"], ["t4", "t5"]]
    student = [torch.randn(2, 8) for _ in texts]
    ours, theirs = row_scores(student), row_scores([torch.stack([teacher[t] for t in c]) for c in texts])

    margin = Distillation(DistillParams(loss="margin_mse"), torch.nn.Identity(), teacher)(student, texts)
    expected = torch.mean(((ours[:, 0] - ours[:, 1]) - (theirs[:, 0] - theirs[:, 1])) ** 2)
    assert float(margin) == pytest.approx(float(expected), rel=1e-5)

    t = 0.1
    kl = Distillation(DistillParams(loss="kl", temperature=t), torch.nn.Identity(), teacher)(student, texts)
    p, log_q = torch.softmax(theirs / t, dim=1), torch.log_softmax(ours / t, dim=1)
    expected = (p * (p.log() - log_q)).sum(dim=1).mean() * t**2
    assert float(kl) == pytest.approx(float(expected), rel=1e-4)


def row_margins(columns: list[torch.Tensor]) -> torch.Tensor:
    scores = row_scores(columns)
    return scores[:, 0] - scores[:, 1]


def student_columns(files, params, teacher, texts) -> list[torch.Tensor]:
    trained = train_model("medical", params, files, teacher)
    trained.model.eval()
    with torch.no_grad():
        return [trained.model.encode(column, convert_to_tensor=True) for column in texts]


@pytest.fixture(scope="module")
def undistilled(tmp_path_factory):
    """The student trained on the same rows with the teacher term off (weight 0: the same for every loss)."""
    train = tmp_path_factory.mktemp("undistilled") / "train.jsonl"
    write_jsonl(train, tiny_rows(24))
    texts = [[row[f] for row in tiny_rows(24)[:8]] for f in TEXT_FIELDS]
    return student_columns([train], distilled_params(0.0, epochs=2, lr=5e-3), None, texts)


@pytest.mark.parametrize(("kind", "weight"), [("matrix_mse", 5.0), ("margin_mse", 50.0), ("kl", 2000.0)])
def test_training_with_a_teacher_moves_the_students_similarities_towards_it(split, undistilled, kind, weight):
    """What reaches the loss: the teacher term changes the trained adapter, towards the teacher."""
    embed_domain(distilled_params(), "medical", teacher_file("medical"))
    teacher = load_teacher([teacher_file("medical")], TEACHER)
    # A teacher whose geometry differs from the student's start: every cosine pulled towards one vector.
    shift = torch.nn.functional.normalize(torch.ones(384), dim=0)
    teacher = {t: torch.nn.functional.normalize(v + 2 * shift, dim=0) for t, v in teacher.items()}
    files = [paths.split_file("medical", "train")]
    texts = [[row[f] for row in split[:8]] for f in TEXT_FIELDS]
    target = [torch.stack([teacher[t] for t in column]) for column in texts]
    measure = similarity_matrix if kind == "matrix_mse" else row_margins
    distilled = student_columns(files, distilled_params(weight, kind, epochs=2, lr=5e-3), teacher, texts)

    def gap(student: list[torch.Tensor]) -> float:
        return float(torch.mean((measure(student) - measure(target)) ** 2))

    assert gap(distilled) < 0.5 * gap(undistilled)


def test_with_distillation_off_the_teacher_embeds_nothing(split, monkeypatch):
    import cachelora.distillation as distillation

    monkeypatch.setattr(distillation, "load_base", lambda *a, **k: pytest.fail("the teacher was loaded"))
    assert embed_domain(distilled_params(weight=0.0), "medical", teacher_file("medical")) == 0
    assert load_teacher([teacher_file("medical")], TEACHER) == {}


def test_the_teacher_file_is_the_same_bytes_on_every_write(split):
    """DVC tracks it by checksum: a re-run that wrote other bytes would re-run every training stage
    (safetensors orders several metadata keys differently on each write)."""
    outs = [Path(f"{i}.safetensors") for i in range(6)]
    for out in outs:
        embed_domain(distilled_params(weight=0.0), "medical", out)
    assert len({out.read_bytes() for out in outs}) == 1
