"""Three lm-evaluation-harness tasks of our own, as local task YAMLs over local JSON lines (nothing is
downloaded): multiple choice (loglikelihood accuracy), perplexity (loglikelihood_rolling) and
generate-until (exact match)."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("Two plus two equals", [" seven", " four", " ten"], 1),
    ("The sun rises in the", [" west", " north", " east"], 2),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Rankine"], 0),
    ("The opposite of hot is", [" warm", " cold", " loud"], 1),
    ("A week has seven", [" years", " hours", " days"], 2),
]
PASSAGES = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows.",
    "All the world's a stage, and all the men and women merely players; they have their exits and their entrances.",
]
TASKS = {
    "swarmlm_choice": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "swarmlm_perplexity": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
    "swarmlm_completion": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 8, do_sample: false}
metric_list: [{metric: exact_match}]
""",
}


def write_tasks(folder: Path) -> None:
    rows = {
        "swarmlm_choice": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "swarmlm_perplexity": [{"text": t} for t in PASSAGES],
        "swarmlm_completion": [{"question": q, "answer": c[a]} for q, c, a in QUESTIONS],
    }
    for name, body in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + body)
