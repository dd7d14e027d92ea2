"""How the reference models are trained: each model's committed recipe, and the modules that
only its training uses. Nothing here is needed to load, patch or score a reference model, and
the training-only modules are not part of the library's API: `tokensieve.reference` exports the
recipes themselves (RECIPES, Phase, Recipe) and `train_reference`, which runs them.

    definitions.py  Phase, Recipe and RECIPES: the phases of each reference model's recipe
    phases.py       what a phase trains with (data, loss, the output it reads, its validation),
                    for every phase but nlvr's own
    batches.py      how those phases batch a task's samples
    auxiliary.py    AttributeHead: dense colour×shape supervision of an image encoder (tos,
                    retrieval; nlvr's object readouts reuse its loss)
    nlvr/           the nlvr recipe's own phases: the tower's perception, then the statements
                    over its frozen tokens
"""

from tokensieve.reference.recipes.definitions import DATA, RECIPES, Phase, Recipe

__all__ = ["DATA", "RECIPES", "Phase", "Recipe"]
