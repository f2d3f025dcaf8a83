"""Read policy files: TOML, `extends` chains (cycles refused), per-file validation."""
import os
import stat
import tomllib

from ..errors import PolicyError
from . import schema

SHIPPED_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.toml")


MAX_POLICY_BYTES = 1 << 20  # a policy is a page of text; anything bigger is a mistake


def _read_bytes(path: str) -> bytes:
    """The file's bytes: a regular file only (a FIFO or a device would block or never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError("not a regular file", path)
        if st.st_size > MAX_POLICY_BYTES:
            raise PolicyError(f"larger than {MAX_POLICY_BYTES} bytes: not a policy file", path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_POLICY_BYTES + 1)
    finally:
        os.close(fd)


def read_file(path: str) -> dict:
    try:
        data = tomllib.loads(_read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise PolicyError("policy file not found", path) from None
    except IsADirectoryError:
        raise PolicyError("is a directory, not a policy file", path) from None
    except PermissionError as e:
        raise PolicyError(f"cannot read: {e.strerror}", path) from None
    except OSError as e:
        raise PolicyError(f"cannot read: {e.strerror or e}", path) from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"not valid TOML: {e}", path) from None
    except UnicodeDecodeError:
        raise PolicyError("not valid TOML: not UTF-8 text", path) from None
    except (ValueError, RecursionError, MemoryError) as e:  # e.g. a NUL in the path, absurd nesting
        raise PolicyError(f"cannot read: {type(e).__name__}: {e}"[:300], path) from None
    return schema.validate(data, path)


def resolve_extends(value: str, base_dir: str, path) -> str:
    """"default" -> a sibling default.toml, else the shipped one; anything else is a path."""
    if "/" not in value and not value.endswith(".toml"):
        sibling = os.path.join(base_dir, value + ".toml")
        if os.path.exists(sibling) or value != "default":
            return sibling
        return SHIPPED_DEFAULT
    return os.path.normpath(os.path.join(base_dir, value))


def load_chain(data: dict, path: str | None, base_dir: str, seen: tuple = ()) -> tuple[dict, list]:
    """Merge `data` over everything it extends. Returns (effective tables, chain of files)."""
    chain = [path] if path else []
    parent_name = data.get("extends")
    if parent_name is None:
        return schema.merge(schema.defaults(), data), chain
    parent = os.path.realpath(resolve_extends(parent_name, base_dir, path))
    if parent in seen or (path and parent == os.path.realpath(path)):
        cycle = " -> ".join(list(seen) + [parent])
        raise PolicyError(f"cycle in extends: {cycle}", path, "extends")
    if not os.path.exists(parent):
        raise PolicyError(f"extends {parent_name!r}, but {parent} does not exist", path, "extends")
    parent_data = read_file(parent)
    merged, parent_chain = load_chain(parent_data, parent, os.path.dirname(parent),
                                      seen + ((os.path.realpath(path),) if path else ()) + (parent,))
    return schema.merge(merged, data), chain + parent_chain


def absolute_paths(paths, base_dir):
    return [p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in paths]
