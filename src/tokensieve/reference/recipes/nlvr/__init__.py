"""The nlvr recipe's training scaffolding, around its reference model (`vl.build_nlvr`, a small
BLIP). Every wrapper and head here is dropped when the model ships: the shipped weights are the
plain BlipForImageTextRetrieval.

    perception.py  the vision tower learns to tell objects apart in its tokens, and to let a
                   cross-attention find them (the "objects" and "finding" phases)
    statements.py  BLIP's text side learns the statements over the frozen tower's tokens (the
                   "tokens" phase)
    phases.py      what each of those phases trains and on which data, as train_reference runs
                   them
"""
