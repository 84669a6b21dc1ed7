import pytest

from darkknowledge.errors import RegistryError
from darkknowledge.registry import Registry


def test_register_get_list():
    reg: Registry = Registry("thing")

    @reg.register("alpha")
    def alpha():
        return 1

    reg.add("beta", 2)
    assert reg.get("alpha") is alpha and reg.get("beta") == 2
    assert reg.names() == ["alpha", "beta"] and "alpha" in reg and len(reg) == 2


def test_unknown_name_lists_close_names():
    reg: Registry = Registry("loss")
    for n in ("kd", "dkd", "crd", "fitnet"):
        reg.add(n, n)
    with pytest.raises(RegistryError) as err:
        reg.get("fitnett")
    msg = str(err.value)
    assert "unknown loss 'fitnett'" in msg and "'fitnet'" in msg and "Valid loss names: crd, dkd, fitnet, kd" in msg


def test_duplicate_registration_is_refused():
    reg: Registry = Registry("model")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    reg.add("a", 3, overwrite=True)
    assert reg.get("a") == 3
