"""PooledEmbeddingAgreementTask: the cosine of pooled embeddings against the uncompressed copy it keeps."""
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from structured_compress.config_checks import ConfigError, check_config
from structured_compress.surgery import compress_
from structured_compress.tasks.embedding_agreement import PooledEmbeddingAgreementTask

from .conftest import compose_config

transformers = pytest.importorskip("transformers")


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def test_metrics(task: PooledEmbeddingAgreementTask) -> dict:
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
               for _ in range(3)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.test(task, dataloaders=DataLoader(batches, batch_size=None), verbose=False)[0]


test_metrics.__test__ = False  # a helper, not a test


def test_the_uncompressed_model_agrees_with_itself():
    metrics = test_metrics(PooledEmbeddingAgreementTask(tiny_bert()))
    assert metrics["test/cosine"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["test/embedding_rel_error"] == pytest.approx(0.0, abs=1e-6)


def test_a_negated_pooler_gives_cosine_minus_one():
    """tanh is odd: negating the pooler's weight and bias negates every pooled embedding."""
    task = PooledEmbeddingAgreementTask(tiny_bert())
    with torch.no_grad():
        task.model.pooler.dense.weight.neg_()
        task.model.pooler.dense.bias.neg_()
    metrics = test_metrics(task)
    assert metrics["test/cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert metrics["test/embedding_rel_error"] == pytest.approx(2.0, abs=1e-5)


def test_surgery_changes_the_model_but_not_the_reference():
    task = PooledEmbeddingAgreementTask(tiny_bert())
    before = {k: v.clone() for k, v in task.reference.state_dict().items()}
    report = compress_(task.model, "lowrank", 0.1, include=["encoder.*"])
    assert report.summary()["replaced_layers"] == 12
    after = task.reference.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    metrics = test_metrics(task)
    assert metrics["test/embedding_rel_error"] > 1e-4 and metrics["test/cosine"] < 1.0


def test_training_it_is_refused_with_the_fix(tmp_path):
    cfg = compose_config(["experiment=glue/bert-ptq-svdq-cosine", "mode=train"], tmp_path)
    with pytest.raises(ConfigError, match="mode.name=train: task PooledEmbeddingAgreementTask only evaluates") as err:
        check_config(cfg)
    assert "use mode=compress" in str(err.value)
