"""The learner's once-per-update preparation and its per-minibatch loss, on a learner built in the test process
(no Ray) and hand-made batches (tests/learner_batch.py)."""

import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from gigpo_rllib.losses import k3_kl
from gigpo_rllib.rl_module import TOKEN_LOGPROBS
from tests.learner_batch import local_learner, prepared_batch, synthetic_batch


def test_reference_kl_is_exactly_zero_before_the_first_update_in_bfloat16():
    learner = local_learner(model_dtype="bfloat16", init_kl_coef=0.1, minibatch_size=4)
    columns = prepared_batch(learner, synthetic_batch())
    for start in range(0, len(columns["input_ids"]), 4):
        minibatch = {name: value[start:start + 4] for name, value in columns.items()}
        with torch.no_grad():
            logprobs = learner.module[DEFAULT_MODULE_ID].forward_train(minibatch)[TOKEN_LOGPROBS]
        mask = minibatch["response_mask"].bool()
        assert k3_kl(logprobs, minibatch["reference_logprobs"])[mask].abs().max().item() == 0.0
