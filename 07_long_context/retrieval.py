"""Retrieval instead of a long context: find the relevant piece, give the model only that piece.

A model with a short window cannot read a fact that lies far back; a model with a long context pays
O(T^2) attention and may not have learned to use far positions. Retrieval sidesteps both: split the
long text into pieces, score each piece against the question, and put only the best piece in the
prompt. TF-IDF scoring (scikit-learn's TfidfVectorizer: smooth idf, l2-normalised rows) is the classic:

    tfidf(t, d) = tf(t, d) * idf(t),   idf(t) = ln((1 + n) / (1 + df(t))) + 1
    score(q, d) = tfidf(q) . tfidf(d) / (|tfidf(q)| |tfidf(d)|)              (cosine similarity)

with tf the count of term t in piece d, n the number of pieces and df(t) how many pieces contain t.
A rare term that the question shares with a piece scores high; a term in every piece scores little.

Contents:
  TfidfRetriever      fit on pieces of text; search(query, k) -> [(index, score)] best first
  key_value_pieces    a key-value prompt (16's KeyValueTask) -> its "key:value" pairs and its query key
  retrieval_prompt    the same question asked over only the top-k retrieved pairs (a short prompt)
"""

from sklearn.feature_extraction.text import TfidfVectorizer

KEY_VALUE_TERMS = r"[^,:|=\s]+:?"  # "ab:x" -> terms "ab:" (a key) and "x" (a value)


class TfidfRetriever:
    """TF-IDF over a fixed list of pieces; search() ranks them by cosine similarity to a query.

    token_pattern is the regular expression of one term (scikit-learn's default: words of 2+ word
    characters); key-value prompts use KEY_VALUE_TERMS, where a one-character key is a term.
    """

    def __init__(self, pieces: list[str], token_pattern: str = r"(?u)\b\w\w+\b"):
        if not isinstance(pieces, (list, tuple)) or not pieces or not all(isinstance(p, str) for p in pieces):
            raise ValueError(f"pieces must be a non-empty list of strings, got {pieces!r:.80}")
        self.pieces = list(pieces)
        self.vectorizer = TfidfVectorizer(token_pattern=token_pattern, lowercase=False)
        try:
            self.matrix = self.vectorizer.fit_transform(self.pieces)  # (n, terms), sparse, rows of norm 1
        except ValueError as error:  # scikit-learn: "empty vocabulary" when no piece holds a term
            raise ValueError(f"pieces hold no term matching token_pattern {token_pattern!r}: {error}") from error

    def scores(self, query: str):
        """Cosine similarity of the query with every piece: a numpy array (n,)."""
        if not isinstance(query, str):
            raise ValueError(f"query must be a string, got {type(query).__name__}")
        return (self.matrix @ self.vectorizer.transform([query]).T).toarray().ravel()

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The k best pieces as (index, score), best first; ties keep the pieces' order."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.pieces):
            raise ValueError(f"k must be an integer in [1, {len(self.pieces)}] (the number of pieces), got {k!r}")
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]  # stable: earlier piece wins a tie
        return [(i, float(scores[i])) for i in order]


def key_value_pieces(prompt: str) -> tuple[list[str], str]:
    """'ab:x,cd:y|cd=' -> (['ab:x', 'cd:y'], 'cd'): the pairs (the pieces to search) and the query key."""
    if not isinstance(prompt, str) or prompt.count("|") != 1 or not prompt.endswith("="):
        raise ValueError(f"prompt must look like 'key:value,...|key=' (16's KeyValueTask), got {prompt!r}")
    pairs, query = prompt[:-1].split("|")
    return pairs.split(","), query


def retrieval_prompt(prompt: str, k: int = 1) -> str:
    """The same question over only the k pairs TF-IDF ranks highest for the query key: a prompt of k pairs
    (kept in their original order) instead of all of them, short enough for any window."""
    pieces, query = key_value_pieces(prompt)
    # A key is the term "ab:" (colon included), so a value that happens to spell the query key does not tie
    # with the pair the query asks for.
    retriever = TfidfRetriever(pieces, token_pattern=KEY_VALUE_TERMS)
    kept = sorted(index for index, _ in retriever.search(query + ":", min(k, len(pieces))))
    return ",".join(pieces[i] for i in kept) + f"|{query}="
