"""Shared fixtures: a tiny lexicon, tiny params, and a temp working directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cachelora.params import Params

TINY_LEXICON = {
    "domain": "medical",
    "topics": [
        {"name": "hypertension", "aliases": ["high blood pressure"], "group": "heart"},
        {"name": "heart failure", "group": "heart"},
        {"name": "asthma", "aliases": ["bronchial asthma"], "group": "lungs"},
        {"name": "pneumonia", "group": "lungs"},
        {"name": "migraine", "group": "brain"},
        {"name": "epilepsy", "aliases": ["seizure disorder"], "group": "brain"},
    ],
    "aspects": {
        "symptoms": {
            "templates": [
                "What are the symptoms of {topic}?",
                "how do i know if i have {topic}",
                "{topic} warning signs in adults",
                "early signs of {topic}",
                "what does {topic} feel like",
                "could my tiredness be {topic}",
            ]
        },
        "treatment": {
            "templates": [
                "How is {topic} treated?",
                "best treatment options for {topic}",
                "what do doctors prescribe for {topic}",
                "{topic} medication list",
                "can {topic} be treated at home",
                "therapy that works for {topic}",
            ]
        },
        "causes": {
            "templates": [
                "What causes {topic}?",
                "why do people get {topic}",
                "main causes of {topic} explained",
                "is {topic} genetic",
                "what triggers {topic} in adults",
                "root cause of {topic}",
            ]
        },
    },
}


def tiny_params(**overrides: object) -> Params:
    """Params for one tiny domain; ``overrides`` replace top-level sections."""
    raw: dict = {
        "domains": ["medical"],
        "train_models": ["medical", "multi"],
        "generate": {"seed": 1, "triplets_per_domain": 60, "sibling_negative_fraction": 0.25, "corpus": None},
        "validate": {"min_rows": 10, "max_bad_fraction": 0.2},
        "split": {"seed": 1, "train": 0.6, "val": 0.2, "test": 0.2},
        "evaluate": {"reference_models": []},
    }
    raw.update(overrides)
    return Params.model_validate(raw)


@pytest.fixture
def seed_dir(tmp_path: Path) -> Path:
    """A data/seed folder holding the tiny medical lexicon."""
    folder = tmp_path / "data" / "seed"
    folder.mkdir(parents=True)
    (folder / "medical.yaml").write_text(yaml.safe_dump(TINY_LEXICON), encoding="utf-8")
    return folder


def tiny_model_params(**train: object) -> Params:
    """tiny_params with a few fast training steps."""
    return tiny_params(
        train={"lr": 1e-3, "batch_size": 8, "epochs": 1, "max_seq_length": 24, "seed": 3, "device": "cpu", **train},
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
    )


def tiny_rows(count: int = 40, seed: int = 1) -> list[dict]:
    """Offline triplets from the tiny lexicon (no files needed)."""
    from cachelora.generation import OfflineGenerator
    from cachelora.lexicon import Lexicon

    return OfflineGenerator(Lexicon.model_validate(TINY_LEXICON), seed, 0.25).generate(count)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny adapter trained and saved once for the whole session (read-only for tests)."""
    from cachelora.adapters import save_adapter
    from cachelora.records import write_jsonl
    from cachelora.training import train_model

    root = tmp_path_factory.mktemp("adapter")
    train_file = root / "train.jsonl"
    write_jsonl(train_file, tiny_rows())
    trained = train_model("medical", tiny_model_params(), [train_file])
    save_adapter(trained.model, root / "medical", "all-MiniLM-L6-v2", trained.info, trained.probe)
    return root / "medical"


S3_DUMMY_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}  # moto accepts any


class LoopbackS3:
    """moto's S3 server in a thread on a free 127.0.0.1 port, with ``bucket`` created:
    ``with LoopbackS3(repo) as endpoint: ...``. With ``repo``, ``dvc remote modify --local`` points
    its ``remote`` at the server, with dummy credentials. moto's state is process-wide: it is reset
    on start and on stop."""

    def __init__(self, repo: Path | None = None, bucket: str = "cachelora", remote: str = "storage") -> None:
        self.repo, self.bucket, self.remote = repo, bucket, remote
        self.server: object | None = None
        self.endpoint = ""

    def __enter__(self) -> str:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        try:
            self._reset()
            boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                aws_access_key_id=S3_DUMMY_CREDENTIALS["access_key_id"],
                aws_secret_access_key=S3_DUMMY_CREDENTIALS["secret_access_key"],
            ).create_bucket(Bucket=self.bucket)
            if self.repo is not None:
                self._configure(self.repo)
        except BaseException:
            self.server.stop()
            raise
        return self.endpoint

    def __exit__(self, *exc: object) -> None:
        try:
            self._reset()
        except OSError:
            pass
        finally:
            self.server.stop()

    def _configure(self, repo: Path) -> None:
        import os
        import subprocess
        import sys

        for key, value in {"endpointurl": self.endpoint, **S3_DUMMY_CREDENTIALS}.items():
            subprocess.run(
                [sys.executable, "-m", "dvc", "remote", "modify", "--local", self.remote, key, value],
                cwd=repo,
                env={**os.environ, "DVC_NO_ANALYTICS": "1"},
                check=True,
                capture_output=True,
            )

    def _reset(self) -> None:
        import http.client

        conn = http.client.HTTPConnection(self.endpoint.removeprefix("http://"), timeout=10)
        try:
            conn.request("POST", "/moto-api/reset")
            assert conn.getresponse().status == 200
        finally:
            conn.close()
