"""A self-generated LaMP-2-style movie tagging set, so the demo runs without the licensed LaMP data.

Users belong to latent taste groups, which is what MTA's anchor clustering is meant to discover.
Every movie description carries cues for two tags, so the description alone is ambiguous and the
user's history is what decides the tag, as with real LaMP-2 where users tag the same movie
differently.
"""

from __future__ import annotations

import random

from mta.metrics import LAMP2_LABELS

LAMP2_PROMPT = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag name "
    "without further explanation. tags: [" + ", ".join(LAMP2_LABELS) + "] description: "
)

# User ``u`` belongs to group ``u % len(TASTE_GROUPS)``. The left-over tags (based on a book,
# dark comedy, fantasy, violence) only appear as off-taste noise.
TASTE_GROUPS = [
    ["sci-fi", "dystopia", "action"],
    ["comedy", "romance"],
    ["psychology", "twist ending", "thought-provoking"],
    ["true story", "social commentary", "classic"],
]

# Protagonists and plots per tag; every protagonist is singular so any pair forms a sentence.
TAG_PHRASES: dict[str, dict[str, list[str]]] = {
    "sci-fi": {
        "who": ["A starship crew", "A lone android engineer", "A colonist on a distant moon",
                "A scientist with a time machine"],
        "what": ["picks up a mysterious signal from beyond the galaxy",
                 "must repair a failing reactor before the orbit decays",
                 "discovers that alien technology is rewriting human memories",
                 "races across light years to stop a rogue artificial intelligence"],
    },
    "based on a book": {
        "who": ["A shy village schoolteacher", "The heir of a proud family", "A young governess",
                "An orphan raised by relatives"],
        "what": ["lives through the story of the celebrated novel faithfully adapted here",
                 "narrates a life drawn straight from the pages of a much-loved novel",
                 "brings the author's bestselling book to life chapter by chapter",
                 "retraces the plot of a famous literary saga across several decades"],
    },
    "comedy": {
        "who": ["A clumsy wedding planner", "A grumpy next-door neighbor",
                "A hapless substitute teacher", "An overconfident talk show host"],
        "what": ["stumbles through one hilarious mishap after another before the big day",
                 "starts a silly prank war that spirals into a ridiculous feud",
                 "accidentally becomes famous for a joke nobody was meant to hear",
                 "tries to fake a perfect family holiday with laughably bad results"],
    },
    "action": {
        "who": ["A retired special forces soldier", "A rookie bomb disposal cop",
                "A reckless getaway driver", "An elite bodyguard"],
        "what": ["fights through explosive car chases to rescue a kidnapped diplomat",
                 "battles armed mercenaries in a skyscraper rigged with explosives",
                 "outruns helicopters and gunfire across a burning city at night",
                 "takes on a ruthless cartel in a relentless series of shootouts"],
    },
    "twist ending": {
        "who": ["A grieving detective", "A man with no memory", "A young widow",
                "A quiet hotel guest"],
        "what": ["uncovers clues that point to a shocking truth nobody saw coming",
                 "pieces together a puzzle whose final reveal changes everything",
                 "learns in the last scene that nothing was what it seemed",
                 "follows a trail of lies toward a surprise ending that flips the story"],
    },
    "dystopia": {
        "who": ["A factory worker under constant surveillance", "A rebel in a walled city",
                "A citizen of a totalitarian state", "A teenage girl in a ruined future"],
        "what": ["defies the oppressive regime that controls every thought and ration",
                 "joins an underground resistance against the government propaganda machine",
                 "struggles to survive after society collapses into authoritarian rule",
                 "questions the rigid caste system enforced by drones and curfews"],
    },
    "dark comedy": {
        "who": ["A cynical funeral director", "An incompetent hitman",
                "A bitter insurance clerk", "A dysfunctional family"],
        "what": ["turns a botched murder into a grimly absurd farce",
                 "finds gallows humor in a string of morbid accidents",
                 "schemes to profit from a corpse with darkly funny consequences",
                 "buries a relative in secret amid deadpan jokes about death"],
    },
    "classic": {
        "who": ["A Hollywood starlet of the golden age", "A principled small-town lawyer",
                "A wartime nightclub owner", "A silent film star"],
        "what": ["anchors this timeless masterpiece that shaped generations of filmmakers",
                 "appears in an enduring studio-era drama still revered by critics",
                 "leads a legendary old Hollywood picture remembered for its iconic lines",
                 "stars in a vintage black and white film of lasting influence"],
    },
    "psychology": {
        "who": ["A troubled psychiatrist", "A patient with split personalities",
                "An insomniac office worker", "A hypnotherapist"],
        "what": ["descends into the fractured mind of a disturbed killer",
                 "confronts repressed trauma and obsessive thoughts during therapy sessions",
                 "loses the line between memory, delusion and reality",
                 "explores the unconscious fears that drive paranoia and guilt"],
    },
    "fantasy": {
        "who": ["A young wizard", "An elf princess", "A humble farm boy", "A band of dwarves"],
        "what": ["quests for an enchanted sword to defeat a dark sorcerer",
                 "journeys through magical kingdoms guarded by dragons and ancient spells",
                 "discovers a hidden realm of fairies, curses and prophecy",
                 "seeks a cursed ring deep inside a mythical mountain"],
    },
    "romance": {
        "who": ["A lonely bookshop owner", "A young violinist", "A heartbroken chef",
                "A travelling photographer"],
        "what": ["falls in love with a charming stranger during one magical summer",
                 "rekindles a passionate romance with a first love from years ago",
                 "meets a soulmate in Paris and must choose between love and career",
                 "writes secret love letters to a neighbor across the courtyard"],
    },
    "thought-provoking": {
        "who": ["A philosophy student", "An aging astronaut", "A village priest",
                "A reclusive mathematician"],
        "what": ["wrestles with profound questions about free will and the meaning of life",
                 "reflects on mortality, memory and what makes us human",
                 "challenges the audience to rethink morality, faith and identity",
                 "contemplates consciousness and existence in a quietly meditative story"],
    },
    "social commentary": {
        "who": ["A struggling immigrant family", "A low-wage warehouse worker",
                "A journalist in a divided town", "A housekeeper for a wealthy household"],
        "what": ["exposes the inequality, racism and class divides of modern society",
                 "critiques corporate greed and the treatment of the working poor",
                 "holds a mirror to political corruption and media manipulation",
                 "confronts poverty, privilege and injustice in a sharp satire"],
    },
    "violence": {
        "who": ["A vengeful gang enforcer", "A brutal prison inmate", "A masked killer",
                "A hardened mob boss"],
        "what": ["leaves a bloody trail of savage beatings and gory murders",
                 "unleashes graphic brutality in a merciless war between rival gangs",
                 "slaughters enemies one by one in a relentless bloodbath",
                 "wages a vicious, blood-soaked campaign of torture and revenge"],
    },
    "true story": {
        "who": ["A real-life whistleblower", "A determined civil rights lawyer",
                "A record-breaking athlete", "A wartime code breaker"],
        "what": ["recounts the true events behind a famous historical case",
                 "is portrayed in this biopic based on real events and people",
                 "relives an incredible true story documented by newspapers of the era",
                 "inspires this dramatization of a remarkable real-life achievement"],
    },
}

# Share of profile items tagged from the user's taste; the rest are uniform noise over all tags.
_ON_TASTE = 0.8


def _premise(tag: str, rng: random.Random) -> str:
    phrases = TAG_PHRASES[tag]
    return f"{rng.choice(phrases['who'])} {rng.choice(phrases['what'])}."


def _describe(tag: str, rng: random.Random) -> str:
    """One premise for ``tag`` and one for a distractor tag, in random order."""
    distractor = rng.choice([t for t in LAMP2_LABELS if t != tag])
    sentences = [_premise(tag, rng), _premise(distractor, rng)]
    rng.shuffle(sentences)
    return " ".join(sentences)


def make_movie_tagging(
    num_users: int = 24, items_per_user: int = 10, seed: int = 0
) -> list[dict]:
    """Users in the per-user LaMP layout of ``../shared/data/lamp/movie_tagging.json``.

    Each user weights their group's tags individually, so users of a group are alike but not
    identical; the query's gold is drawn from those weights. Ids are numeric strings unique
    across the whole set, like LaMP's.
    """
    if num_users < 1 or items_per_user < 1:
        raise ValueError(
            f"need at least one user and one item per user, got num_users={num_users}, "
            f"items_per_user={items_per_user}"
        )
    rng = random.Random(seed)
    next_id = 0
    users = []
    for user_id in range(num_users):
        taste = TASTE_GROUPS[user_id % len(TASTE_GROUPS)]
        weights = [rng.uniform(0.5, 1.5) for _ in taste]
        profile = []
        for _ in range(items_per_user):
            if rng.random() < _ON_TASTE:
                tag = rng.choices(taste, weights)[0]
            else:
                tag = rng.choice(LAMP2_LABELS)
            profile.append({"id": str(next_id), "description": _describe(tag, rng), "tag": tag})
            next_id += 1
        gold = rng.choices(taste, weights)[0]
        query = {"id": str(next_id), "input": LAMP2_PROMPT + _describe(gold, rng), "gold": gold}
        next_id += 1
        users.append({"user_id": user_id, "profile": profile, "query": [query]})
    return users
