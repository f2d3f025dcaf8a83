"""Render Markdown to HTML with the pure-Python `markdown` library."""
import markdown


def render(text: str, extensions=("tables", "fenced_code")) -> str:
    return markdown.markdown(text, extensions=list(extensions))


def headings(text: str) -> list:
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
