"""translation: BART or T5 turns `source` into `target` in another language (see models/seq2seq.py).

Output as `transformers.pipeline("translation")`: `{"translation_text": ...}`. Metrics: corpus-level
sacreBLEU (13a tokenisation) and chrF, both 0-100 as the sacrebleu package reports them; both keep
n-gram match counts only, so memory does not grow with the eval split.
"""

from __future__ import annotations

import random


from models.seq2seq import GeneratedTextMetric, Seq2SeqTask


class TranslationMetric(GeneratedTextMetric):
    def __init__(self, options):
        super().__init__(options)
        from torchmetrics.text import CHRFScore, SacreBLEUScore  # only where metrics are computed

        self.bleu = SacreBLEUScore(tokenize="13a")
        self.chrf = CHRFScore(n_word_order=0)  # chrF (chrF++ counts word n-grams too)

    def to(self, device):
        self.bleu, self.chrf = self.bleu.to(device), self.chrf.to(device)
        return self

    def add(self, predictions, references):
        self.bleu.update(predictions, [[r] for r in references])
        self.chrf.update(predictions, [[r] for r in references])

    def compute(self):  # torchmetrics sums the counts of all workers under torch.distributed
        return {"sacrebleu": 100 * float(self.bleu.compute()), "chrf": 100 * float(self.chrf.compute())}


class Translation(Seq2SeqTask):
    name = "translation"
    output_key = "translation_text"
    output_columns = {"translation_text": "string"}
    best_metric = "sacrebleu"
    best_metric_mode = "max"

    def metrics(self, labels, options):
        return TranslationMetric(options)

    def demo_data(self, n, seed):
        """English-like sentences into a French-like word code, with the adjective moved after its noun:
        a lexicon and one reordering rule to learn."""
        rng = random.Random(seed)
        nouns = {
            "cat": "chat",
            "dog": "chien",
            "bird": "oiseau",
            "horse": "cheval",
            "fish": "poisson",
            "mouse": "souris",
            "child": "enfant",
            "king": "roi",
        }
        adjectives = {
            "red": "rouge",
            "small": "petit",
            "black": "noir",
            "white": "blanc",
            "old": "vieux",
            "happy": "content",
            "green": "vert",
            "tall": "grand",
        }
        verbs = {
            "sees": "voit",
            "eats": "mange",
            "likes": "aime",
            "follows": "suit",
            "finds": "trouve",
            "hears": "entend",
        }
        rows = []
        for i in range(n):
            a, b = rng.sample(sorted(nouns), 2)
            adj, verb = rng.choice(sorted(adjectives)), rng.choice(sorted(verbs))
            if rng.random() < 0.5:
                source = f"the {adj} {a} {verb} the {b}"
                target = f"le {nouns[a]} {adjectives[adj]} {verbs[verb]} le {nouns[b]}"
            else:
                source = f"the {a} {verb} the {adj} {b}"
                target = f"le {nouns[a]} {verbs[verb]} le {nouns[b]} {adjectives[adj]}"
            rows.append({"id": f"tr-{seed}-{i}", "source": source, "target": target})
        return rows


TASK = Translation()
