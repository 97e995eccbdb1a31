"""The 37 Oxford-IIIT Pet breeds, as that dataset names, numbers and groups them."""

from __future__ import annotations

from adapter_contract.labels import Label

CATS = [
    "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
    "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
]
DOGS = [
    "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
    "japanese_chin", "keeshond", "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug",
    "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
]
# Oxford-IIIT Pet's CLASS-ID: 1-based position in the case-insensitive alphabetical order.
CLASS_IDS = {name: i + 1 for i, name in enumerate(sorted(CATS + DOGS, key=str.lower))}
SPECIES_IDS = {1: "cat", 2: "dog"}


def display_text(breed_id: str) -> str:
    """'american_pit_bull_terrier' -> 'American Pit Bull Terrier'."""
    return " ".join(word.capitalize() for word in breed_id.split("_"))


def label_for(breed_id: str, species: str | None = None) -> Label:
    if species is None:
        species = "cat" if breed_id in CATS else "dog" if breed_id in DOGS else None
    return Label(id=breed_id, text=display_text(breed_id), species=species)


def species_id(breed_id: str) -> int:
    return 1 if breed_id in CATS else 2
