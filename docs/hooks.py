"""mkdocs hooks: the reference pages are made from the code at build time (visionlora.reference)."""

from __future__ import annotations

from mkdocs.structure.files import File

GENERATED = {
    "reference/settings.md": "settings_markdown",
    "reference/cli.md": "cli_markdown",
    "reference/run-files.md": "schema_markdown",
}


def on_files(files, config):
    from visionlora import reference

    for path, maker in GENERATED.items():
        files.append(File.generated(config, path, content=getattr(reference, maker)()))
    return files
