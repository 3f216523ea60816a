# Vendored verbatim from EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3
# (MIT License, Copyright (c) 2025 LMMs-Lab; see lmms_eval_ref/LICENSE) for the
# differential tests only; never imported by the package. MMBench_Evaluator's matcher (mmbench/mmbench_evals.py), realworldqa/utils.py and videomme/utils.py process_results.
# Only imports were changed (lmms_eval.* -> the sibling copies, loguru -> logging).
# ruff: noqa

import logging
import string

from .mcq_extract import extract_mcq_answer

eval_logger = logging.getLogger("lmms_eval_ref")


class MMBench_Evaluator:
    def can_infer_option(self, answer, num_choice=5):
        choices = string.ascii_uppercase[:num_choice]
        if "Failed to obtain answer via API" in answer:
            return False

        def count(splits, choices="ABCD", prefix="", suffix=""):
            cnt = 0
            for c in choices:
                if prefix + c + suffix in splits:
                    cnt += 1
            return cnt

        splits = [x.strip() for x in answer.split()]
        if count(splits, choices) == 1:
            for ch in choices:
                if "A" in splits and len(splits) > 3:
                    eval_logger.info(f"A might be a quantifier in the string: {answer}.")
                    break
                if ch in splits:
                    return ch
        tups = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]
        for tup in tups:
            if count(splits, choices, prefix=tup[0], suffix=tup[1]) == 1:
                for ch in choices:
                    if tup[0] + ch + tup[1] in splits:
                        return ch
        return False

    def can_infer_text(self, answer, choices):
        answer = answer.lower()
        assert isinstance(choices, dict)
        for k in choices:
            assert k in "ABCD"
            choices[k] = str(choices[k]).lower()
        cands = []
        for k in choices:
            if choices[k] in answer:
                cands.append(k)
        if len(cands) == 1:
            return cands[0]
        return False

    def can_infer(self, answer, choices):
        copt = self.can_infer_option(answer)
        return copt if copt else self.can_infer_text(answer, choices)


def realworldqa_process_results(doc, results):

    pred = results[0]
    gt_ans = doc["answer"].strip()

    # For MCQ questions (A/B/C/D answers), use the shared extractor
    if gt_ans.upper() in ("A", "B", "C", "D"):
        pred_ans = extract_mcq_answer(pred, choices=["A", "B", "C", "D"])
        score = 1.0 if pred_ans == gt_ans.upper() else 0.0
    else:
        # Open-ended answers (e.g., numeric "0", text "Downhill")
        pred_clean = pred.lower().strip().rstrip(".")
        score = 1.0 if pred_clean == gt_ans.lower() else 0.0

    return {
        "exact_match": score,
    }


def extract_characters_regex(s):

    return extract_mcq_answer(s, choices=["A", "B", "C", "D"])


def videomme_process_results(doc, results):
    """
    Args:
        doc: a instance of the eval dataset
        results: [pred]
    Returns:
        a dictionary with key: metric name (in this case videomme score), value: metric value
    """
    pred = results[0]
    pred_ans = extract_characters_regex(pred)
    gt_ans = doc["answer"]

    category = doc["domain"]
    sub_category = doc["sub_category"]
    task_category = doc["task_type"]
    # score: 0/1 correctness for stderr calculation
    # videoID: for clustered stderr (questions from same video are correlated)
    score = 1.0 if pred_ans.lower() == gt_ans.lower() else 0.0
    data_dict = {
        "question_id": doc["question_id"],
        "duration": doc["duration"],
        "category": category,
        "sub_category": sub_category,
        "task_category": task_category,
        "pred_answer": pred_ans,
        "answer": gt_ans,
        "score": score,
        "videoID": doc["videoID"],
    }

    return {"videomme_perception_score": data_dict}
