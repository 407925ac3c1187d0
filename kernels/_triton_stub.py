"""Stand-ins for `triton` and `triton.language` where Triton is not installed.

Triton is an optional extra (`textgen[kernels]`), but the engine's torch path imports the
*_reference functions from these modules. With the stand-ins the modules still import; any
Triton launcher raises a clear error when called.
"""

_MISSING = "Triton is not installed (pip install 'textgen[kernels]'); only *_reference works"


class _Missing:
    def __init__(self, **known):
        self.__dict__.update(known)

    def __getattr__(self, name):
        raise ModuleNotFoundError(_MISSING)


class _UnavailableKernel:
    def __init__(self, fn):
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        raise ModuleNotFoundError(_MISSING)

    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(_MISSING)


class _Constexpr:  # kernel signatures annotate with tl.constexpr at definition time
    pass


triton = _Missing(jit=_UnavailableKernel)
tl = _Missing(constexpr=_Constexpr)
