"""Integrations: run vae_ext's fused attention where models already run attention.

    vae_ext.integrations.diffusers     FusedAttnProcessor for diffusers' Attention   (extra: vae_ext[diffusers])
    vae_ext.integrations.transformers  register(): attn_implementation="vae_ext"     (extra: vae_ext[transformers])
    vae_ext.integrations.timm          replace_attention() for timm's Attention       (extra: vae_ext[timm])

Each submodule imports its library on first use and, where it is missing, fails with
an ImportError that names the extra to install. Importing this package imports none.
"""


def _require(module: str, extra: str):
    """Import `module` or fail with a message naming the vae_ext extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"vae_ext.integrations.{extra} needs the '{module}' package: "
                          f"pip install 'vae_ext[{extra}]' (or pip install {module})") from e
