"""fsutil.check_name: the one rule for names that become path components."""

import pytest

from scaler_wizard.cache.checkpoints import CheckpointCache
from scaler_wizard.errors import InputError
from scaler_wizard.fsutil import check_name, is_safe_name


@pytest.mark.parametrize("name", ["run-1", "a.b_c", "S00000005-17f", "x" * 128])
def test_safe_names_pass(name):
    assert is_safe_name(name) and check_name("run id", name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "a..b", "..", "a/b", "a\\b", "x" * 129, "é", None, 3])
def test_unsafe_names_are_refused_with_the_kind(name):
    assert not is_safe_name(name)
    with pytest.raises(InputError, match="Invalid run id"):
        check_name("run id", name)


def test_the_checkpoint_cache_uses_it(tmp_path):
    with pytest.raises(InputError, match="Invalid run id 'a..b'"):
        CheckpointCache(tmp_path).run_dir("a..b")
