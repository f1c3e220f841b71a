"""The Gaudi-GBLR paper recipes' budgets give the paper's model MACs (scripts/gaudi_recipe_macs.py)."""
import pytest

from scripts.gaudi_recipe_macs import PAPER, recipe_macs


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_recipe_reproduces_the_papers_macs(experiment):
    result = recipe_macs(experiment)
    assert result["replaced_layers"] > 0
    assert result["ratio_to_paper"] == pytest.approx(1.0, abs=0.005)
