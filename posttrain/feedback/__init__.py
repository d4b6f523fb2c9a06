"""Human feedback: preference labelling (``store``: SQLite queue and labels; ``app``: the web app; ``create``:
items from pairs or sampled from models; ``report``: agreement and the arena board), agreement measures
(``agreement``) and Bradley-Terry ratings (``ratings``). ``posttrain label`` is the command line of this package;
``posttrain loop`` drives the same store through :class:`LabelStore`."""

from posttrain.feedback.store import (
    Card,
    Item,
    LabelError,
    LabelStore,
    Progress,
    Submitted,
)

__all__ = ["Card", "Item", "LabelError", "LabelStore", "Progress", "Submitted"]
