"""What the benchmark scripts write: the data as JSON and the table as Markdown, then print the table."""

import json


def save_report(text, data, json_path=None, markdown_path=None):
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(text + "\n")
    print(text)
