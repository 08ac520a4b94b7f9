import re

WORD = re.compile(r"[A-Za-z']+")
SENTENCE_END = re.compile(r"[.!?]+")


def main(row):
    text = row["text"] or ""
    words = WORD.findall(text)
    sentences = [s for s in SENTENCE_END.split(text) if s.strip()]
    lengths = [len(w) for w in words]
    return {
        "words": len(words),
        "distinct_words": len({w.lower() for w in words}),
        "sentences": len(sentences),
        "mean_word_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "words_per_sentence": len(words) / len(sentences) if sentences else 0.0,
    }
