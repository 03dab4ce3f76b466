"""Every setting of a net is declared once, and every mode is a Literal.

A stage takes its net's settings as one config dataclass (``QFormerConfig``, ``SequenceConfig`` ...)
and passes it on, so no parameter of a stage's ``__init__`` is also a parameter of its net's (a
config group passed on whole, such as the tokenizer's ``quantizer``, may keep its name on both
sides: the dataclass is its one declaration). Modes are ``Literal`` types, which the CLI checks
and :meth:`PredictStage.save_settings` checks for a stage made in Python.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from foundv2.nn.anchor import AnchorHeadConfig, QueryAnchor
from foundv2.nn.mrqvae import MultiViewRQVAE
from foundv2.nn.qformer import CausalQFormer, QFormerConfig
from foundv2.nn.sequence import SequenceConfig, TokenSequenceEncoder
from foundv2.nn.user_codes import UserCodeTokenizer
from foundv2.options import Options
from foundv2.stages.alignment import ALIGN_POOLS, AlignmentStage
from foundv2.stages.probe import LinearHeads, ProbeStage
from foundv2.stages.qanchor import QAnchorStage
from foundv2.stages.qformer import QFORMER_POOLS, QFormerStage
from foundv2.stages.tokenizer import TokenizerStage
from foundv2.stages.user_tokenizer import UserTokenizerStage

# every stage that builds a net, and the net
PAIRS = [(QFormerStage, CausalQFormer), (AlignmentStage, TokenSequenceEncoder), (TokenizerStage, MultiViewRQVAE),
         (UserTokenizerStage, UserCodeTokenizer), (QAnchorStage, QueryAnchor), (ProbeStage, LinearHeads)]
# (the stage's parameter, the net's parameter) that carry the net's config
CONFIGS = [(QFormerStage, "qformer", CausalQFormer, "config"), (AlignmentStage, "sequence", TokenSequenceEncoder, "config"),
           (TokenizerStage, "rqvae", MultiViewRQVAE, "config"), (TokenizerStage, "quantizer", MultiViewRQVAE, "quantizer"),
           (UserTokenizerStage, "user_codes", UserCodeTokenizer, "config"), (QAnchorStage, "head", QueryAnchor, "config")]


def _params(cls) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls.__init__)


def _is_options(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, Options)


@pytest.mark.parametrize(("stage", "net"), PAIRS, ids=lambda c: c.__name__)
def test_no_setting_is_both_a_stage_and_a_net_parameter(stage, net):
    shared = set(_params(stage)) & set(_params(net))
    passed_on = {n for n in shared if _is_options(_hints(stage)[n]) and _hints(stage)[n] is _hints(net)[n]}
    assert shared == passed_on, f"{stage.__name__} and {net.__name__} both declare {sorted(shared - passed_on)}"


@pytest.mark.parametrize(("stage", "stage_arg", "net", "net_arg"), CONFIGS, ids=lambda c: getattr(c, "__name__", c))
def test_the_config_a_stage_passes_on_has_the_nets_type_and_default(stage, stage_arg, net, net_arg):
    kind = _hints(stage)[stage_arg]
    assert _is_options(kind) and _hints(net)[net_arg] is kind
    assert _params(stage)[stage_arg].default == _params(net)[net_arg].default == kind()


def test_num_queries_has_one_default():
    """The drift this layout removes: num_queries was 2 in the stage and 4 in the net."""
    declared = [cls.__name__ for cls in (QFormerStage, CausalQFormer) if "num_queries" in _params(cls)]
    assert declared == []
    defaults = {f.name: f.default for f in dataclasses.fields(QFormerConfig)}
    assert defaults["num_queries"] == 2
    assert _params(QFormerStage)["qformer"].default.num_queries == _params(CausalQFormer)["config"].default.num_queries


@pytest.mark.parametrize(("owner", "name"), [
    (QFormerStage.__init__, "backbone"), (QFormerStage.__init__, "fine_target"), (QFormerStage.__init__, "item_init"),
    (QFormerStage.__init__, "user_pool"), (AlignmentStage.__init__, "user_pool"), (QAnchorStage.__init__, "prefix"),
    (QFormerConfig, "within_window"),
])
def test_modes_are_literals(owner, name):
    assert typing.get_origin(typing.get_type_hints(owner)[name]) is typing.Literal


@pytest.mark.parametrize(("stage", "table"), [(QFormerStage, QFORMER_POOLS), (AlignmentStage, ALIGN_POOLS)],
                         ids=lambda c: getattr(c, "__name__", "table"))
def test_user_pool_choices_are_the_tables_values(stage, table):
    assert typing.get_args(_hints(stage)["user_pool"]) == tuple(table)
    assert _params(stage)["user_pool"].default in table


@pytest.mark.parametrize(("make", "match"), [
    (lambda: QFormerStage(backbone="lstm"), "backbone must be one of"),
    (lambda: AlignmentStage(user_pool="sum_mean"), "user_pool must be one of"),
    (lambda: QAnchorStage(prefix="hard"), "prefix must be one of"),
    (lambda: QFormerConfig(within_window="user"), "within_window must be one of"),
    (lambda: SequenceConfig(dim=10, num_heads=4), "not a multiple of num_heads"),
    (lambda: AnchorHeadConfig.from_dict({"emb": 8}), "unknown head option"),
])
def test_a_mode_or_setting_given_in_python_is_checked_when_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()
