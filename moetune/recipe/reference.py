"""The recipe reference (`moetune explain [KEY | SECTION | TYPE | aliases]`) and the key index behind the
recipe's did-you-mean.

Every field of every section, of every expert type's settings class and of `data.mix[i]` is printed as

      section.key = default  [allowed values]
          its docstring

The expert section lists the keys every type shares, then one group per type (`expert.<type>:`) with the
keys only that type has or whose default differs for it, so that `expert.num_experts` shows up once per
routed type with that type's default. The functions take the recipe's root class (`Recipe`) as an
argument, since it is defined in `moetune.recipe`, which imports this module.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from moetune.core.errors import RecipeError
from moetune.core.schema import allowed_text, field_docs, schema_keys
from moetune.recipe.aliases import FOREIGN_KEYS, aliases_text, foreign_key_hint
from moetune.recipe.experts import EXPERT_CONFIGS, ExpertConfig
from moetune.recipe.sections import MixSource

MIX = "data.mix[i]."


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _entry(key: str, value: Any, allowed: str, doc: str) -> list[str]:
    return [f"  {key} = {value!r}" + (f"  [{allowed}]" if allowed else ""), f"      {doc}"]


def _fields(cls: type, inst: Any, prefix: str, only: set[str] | None = None) -> list[str]:
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if only is None or f.name in only:
            allowed = allowed_text(f)
            if f.name == "type" and issubclass(cls, ExpertConfig):
                allowed = "one of " + ", ".join(map(repr, EXPERT_CONFIGS))
            out += _entry(prefix + f.name, getattr(inst, f.name), allowed, docs.get(f.name, ""))
    return out


def _type_instance(etype: str) -> ExpertConfig:
    return EXPERT_CONFIGS[etype](type=etype)


def _own_keys(etype: str) -> list[str]:
    """The fields of `etype`'s settings that the shared group does not show as they are for it: fields only
    it (and its kin) has, and shared fields whose default, allowed values or docstring differ."""
    cls, shared = EXPERT_CONFIGS[etype], {f.name: f for f in dataclasses.fields(ExpertConfig)}
    base, inst = ExpertConfig(), _type_instance(etype)
    out = []
    for f in dataclasses.fields(cls):
        g = shared.get(f.name)
        if f.name == "type":
            continue
        if (g is None or getattr(inst, f.name) != getattr(base, f.name) or allowed_text(f) != allowed_text(g)
                or field_docs(cls).get(f.name) != field_docs(ExpertConfig).get(f.name)):
            out.append(f.name)
    return out


def _type_notes(etype: str) -> list[str]:
    """What the type does, from its settings class's flags: merge, routing, collapse, the LoRA variants."""
    cls = EXPERT_CONFIGS[etype]
    yes = {True: "yes", False: "no"}
    notes = [f"    merges into the base: {yes[cls.mergeable]}; routes tokens: {yes[cls.routed]}; "
             f"export --collapse: {yes[cls.collapsible]}; saved as a stock PEFT adapter: {yes[cls.stock_peft]}."]
    applies = [k for k, on in (("expert.use_rslora", cls.scaled), ("train.lora_plus_ratio (LoRA+)", cls.lora_plus))
               if on]
    missing = [k for k, on in (("expert.use_rslora", cls.scaled), ("train.lora_plus_ratio", cls.lora_plus)) if not on]
    if applies:
        notes.append(f"    LoRA variants that apply: {', '.join(applies)}.")
    if missing:
        notes.append(f"    Does not apply (refused): {', '.join(missing)}.")
    return notes


def _type_group(etype: str, every_key: bool) -> list[str]:
    """`expert.<type>:` and its keys: those beside the shared ones, or (`every_key`) every key that applies."""
    cls, inst = EXPERT_CONFIGS[etype], _type_instance(etype)
    own = _own_keys(etype)
    lines = [f"expert.{etype}:  {_one_line(cls.__doc__)}", *_type_notes(etype)]
    if every_key:
        return lines + _fields(cls, inst, "expert.")
    if not own:
        return lines + ["    (only the shared expert keys above)"]
    return lines + _fields(cls, inst, "expert.", set(own))


def _expert_section(root: type) -> list[str]:
    lines = [f"expert:  {field_docs(root).get('expert', '')} Keys every type shares (expert.type picks one):"]
    lines += _fields(ExpertConfig, ExpertConfig(), "expert.")
    for etype in EXPERT_CONFIGS:
        lines += [""] + _type_group(etype, every_key=False)
    return lines


def _section(root: type, name: str) -> list[str]:
    if name == "expert":
        return _expert_section(root)
    if name == "data.mix":
        return [f"data.mix[i]:  {_one_line(MixSource.__doc__)}", *_fields(MixSource, MixSource(), MIX)]
    cls = schema_keys(root)[name]
    return [f"{name}:  {field_docs(root).get(name, '')}", *_fields(cls, getattr(root(), name), name + ".")]


def _top_level(root: type) -> list[str]:
    leaves = {n for n, c in schema_keys(root).items() if c is None}
    return ["recipe:  top-level keys", *_fields(root, root(), "", leaves)]


def full(root: type) -> str:
    """Every key: the sections in recipe order, the expert section by type, data.mix[i], the top-level keys."""
    blocks = [_section(root, n) for n, c in schema_keys(root).items() if c is not None]
    blocks.insert([n for n, c in schema_keys(root).items() if c is not None].index("data") + 1,
                  _section(root, "data.mix"))
    blocks.append(_top_level(root))
    return "\n\n".join("\n".join(b) for b in blocks)


def key_index(root: type) -> dict[str, list[str]]:
    """Leaf name -> every dotted key of that name (sections, each expert type, data.mix[i], the top level)."""
    index: dict[str, list[str]] = {}

    def add(name: str, key: str) -> None:
        if key not in index.setdefault(name, []):
            index[name].append(key)
    for name, cls in schema_keys(root).items():
        if cls is None:
            add(name, name)
        elif name != "expert":
            for f in dataclasses.fields(cls):
                add(f.name, f"{name}.{f.name}")
    for cls in EXPERT_CONFIGS.values():
        for f in dataclasses.fields(cls):
            add(f.name, f"expert.{f.name}")
    for f in dataclasses.fields(MixSource):
        add(f.name, MIX + f.name)
    return index


def _expert_key(name: str) -> list[str]:
    """expert.<name> for each type that has it, grouped where default, allowed values and doc agree."""
    groups: dict[tuple, list[str]] = {}
    for etype, cls in EXPERT_CONFIGS.items():
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if f is not None:
            entry = tuple(_fields(cls, _type_instance(etype), "expert.", {name}))
            if name == "type":
                entry = tuple(_fields(ExpertConfig, ExpertConfig(), "expert.", {name}))
            groups.setdefault(entry, []).append(etype)
    if len(groups) == 1 and len(next(iter(groups.values()))) == len(EXPERT_CONFIGS):
        return list(next(iter(groups)))
    lines = []
    for entry, types in groups.items():
        lines += [f"expert.type {' | '.join(types)}:", *entry]
    return lines


def explain(root: type, query: str | None = None) -> str:
    """The reference: everything (`query` None), one section ('train', 'expert', 'data.mix'), one expert type
    ('hydralora' or 'expert.hydralora', every key that applies to it, with its defaults), one key
    ('train.lr', 'expert.num_experts': each type's), 'aliases' (other tools' names), or another tool's name."""
    if query is None or not query.strip():
        return full(root)
    q = query.strip()
    if q.startswith("data.mix["):
        q = "data.mix" + ("." + q.split("].", 1)[1] if "]." in q else "")
    sections = [n for n, c in schema_keys(root).items() if c is not None] + ["data.mix"]
    if q in ("aliases", "names"):
        return aliases_text()
    etype = q.removeprefix("expert.")
    if etype in EXPERT_CONFIGS:
        return "\n".join(_type_group(etype, every_key=True))
    if q in sections:
        return "\n".join(_section(root, q))
    index = key_index(root)
    section, _, name = q.rpartition(".")
    if section == "expert" and any(name in {f.name for f in dataclasses.fields(c)} for c in EXPERT_CONFIGS.values()):
        return "\n".join(_expert_key(name))
    if section == "data.mix" and MIX + name in index.get(name, []):
        return "\n".join(_fields(MixSource, MixSource(), MIX, {name}))
    if section in sections and f"{section}.{name}" in index.get(name, []):
        cls = schema_keys(root)[section]
        return "\n".join(_fields(cls, getattr(root(), section), section + ".", {name}))
    if not section and q in schema_keys(root):
        return "\n".join(_fields(root, root(), "", {q}))
    if not section and q in FOREIGN_KEYS:
        ours = FOREIGN_KEYS[q][0]
        head = _one_line(foreign_key_hint(q)).split(" Other tools'")[0]
        keys = [k.split("=")[0] for k in ours.split(" + ") if not k.startswith("--")]
        return "\n".join([head, *[line for k in keys for line in explain(root, k).splitlines()]])
    if not section and q in index:
        keys = index[q]
        return "\n".join([f"'{q}' is not a top-level key; the keys named {q}: {', '.join(keys)}",
                          *[line for k in keys for line in explain(root, k.replace("[i]", "")).splitlines()]])
    candidates = sections + [f"expert.{t}" for t in EXPERT_CONFIGS] + [k for ks in index.values() for k in ks]
    close = difflib.get_close_matches(q, candidates, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise RecipeError(f"`moetune explain {q}`: no recipe key, section or expert type is called {q!r}.{hint} "
                      f"Allowed: a key (train.lr), a section ({', '.join(sections)}), an expert type "
                      f"({', '.join(EXPERT_CONFIGS)}), 'aliases' (other tools' names), or nothing for every key.")


def unknown_key(root: type, full_key: str, name: str, keys: dict, prefix: str, expert_type: str | None) -> RecipeError:
    """The error for a recipe key `full_key` (leaf `name`) that the section at `prefix` (allowed `keys`) lacks:
    another tool's name (learning_rate -> train.lr), a key of other expert types, the same name in another
    section, or a close spelling here."""
    hint = foreign_key_hint(name)
    if not hint and prefix == "expert.":
        types = [t for t, c in EXPERT_CONFIGS.items() if name in {f.name for f in dataclasses.fields(c)}]
        if types:
            others = [k for k in key_index(root).get(name, []) if not k.startswith("expert.")]
            hint = (f" It is a key of expert type{'s' if len(types) > 1 else ''} {', '.join(types)}; this recipe's "
                    f"expert.type is {expert_type!r}. Set expert.type first, or drop the key "
                    f"(`moetune explain expert.{types[0]}` lists a type's keys)."
                    + (f" Or did you mean {' or '.join(repr(k) for k in others)}?" if others else ""))
    if not hint:
        elsewhere = [k for k in key_index(root).get(name, []) if k != full_key]
        if elsewhere:
            hint = f" Did you mean {' or '.join(repr(k) for k in elsewhere)}?"
    if not hint:
        close = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return RecipeError(f"Unknown recipe key '{full_key}'.{hint} Allowed keys here: {', '.join(keys)}.")
