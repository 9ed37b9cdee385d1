import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _keep_rng():
    """Each test starts from a known seed and leaves the generator as it found it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    yield
    torch.random.set_rng_state(state)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of tensors that differ (keys, shape, dtype or bits) between two modules."""
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    if sa.keys() != sb.keys():
        return sorted(sa.keys() ^ sb.keys())
    return [k for k in sa if sa[k].shape != sb[k].shape or sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
