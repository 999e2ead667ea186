"""Write training/prompts/general_prompts.jsonl: everyday prompts and chat turns about none of the corpus's
entities (no cities, countries or chemical elements), for checking that memories leave general behaviour
alone. Hand-written lists plus templated arithmetic; deterministic. Run: python scripts/make_general_prompts.py
"""

from __future__ import annotations

import json
from pathlib import Path

COMPLETION = [
    # science
    "The planet closest to the sun is",
    "The largest planet in the solar system is",
    "Water boils at sea level at a temperature of",
    "The speed of light in a vacuum is about",
    "Plants make their food through a process called",
    "The powerhouse of the cell is the",
    "The force that keeps us on the ground is called",
    "A triangle with three equal sides is called",
    "The human heart has four",
    "The smallest unit of life is the",
    "Sound travels faster in water than in",
    "The study of living things is called",
    "An animal that eats only plants is called a",
    "The outer layer of the skin is called the",
    "The number of bones in the adult human body is",
    "A year on the planet closest to the sun lasts about",
    "The process of a liquid turning into a gas is called",
    "The red planet is another name for",
    "The moon orbits the earth about once every",
    "Light from the sun reaches the earth in about",
    "The theory of evolution by natural selection was proposed by",
    "The three states of matter are solid, liquid and",
    "An insect has six",
    "A spider has eight",
    "The largest organ of the human body is the",
    "Photosynthesis takes place mainly in the",
    "The unit of electrical resistance is the",
    "The unit of force in physics is the",
    "A baby frog is called a",
    "Whales breathe air through a",
    "The tallest animal in the world is the",
    "The fastest land animal is the",
    "Bees make honey from the nectar of",
    "The lens of the eye focuses light onto the",
    "The bone that protects the brain is the",
    "Earthquakes are measured with an instrument called a",
    "A rainbow forms when sunlight passes through",
    "The layer of gas around the earth is called the",
    "The gas that plants take in from the air is",
    "Vaccines train the immune system to recognise",
    # history, society
    "The first person to walk on the moon was",
    "The printing press with movable type was developed by",
    "The telephone is usually credited to",
    "The light bulb is often credited to",
    "The Renaissance began in the fourteenth",
    "The pyramids of Giza were built as tombs for the",
    "The Second World War ended in the year",
    "The First World War began in the year",
    "The ancient Olympic Games were held in honour of",
    "The Magna Carta was signed in the year",
    "The first powered aeroplane flight took place in the year",
    "The Cold War was a rivalry between two",
    "The Industrial Revolution began in the eighteenth",
    "The fall of the Berlin Wall happened in",
    "The first computer programmer is often said to be",
    "The theory of relativity was developed by",
    "Penicillin was discovered by",
    "The laws of motion were formulated by",
    # literature, art, music
    "Shakespeare wrote the play",
    "The author of Pride and Prejudice is",
    "The Odyssey is an epic poem attributed to",
    "The Mona Lisa was painted by",
    "Moby-Dick was written by",
    "The novel Nineteen Eighty-Four was written by",
    "The Starry Night was painted by",
    "The composer of the Moonlight Sonata is",
    "Romeo and Juliet is a tragedy by",
    "The Hobbit was written by",
    "A poem with fourteen lines is called a",
    "The main character of Sherlock Holmes stories lives at 221B",
    "The Great Gatsby was written by",
    "War and Peace was written by",
    "The Divine Comedy was written by",
    "A story that teaches a moral using animals is called a",
    "The opposite of a comedy in drama is a",
    "A person who writes music is called a",
    "The instrument with 88 keys is the",
    "A group of four musicians is called a",
    # everyday language, definitions
    "The opposite of hot is",
    "The plural of mouse is",
    "The past tense of run is",
    "A synonym for happy is",
    "The first day of the week in many calendars is",
    "There are seven days in a",
    "A dozen eggs means",
    "The month after March is",
    "The colour you get by mixing blue and yellow is",
    "The colour you get by mixing red and white is",
    "A baby dog is called a",
    "A baby cat is called a",
    "The meal eaten in the morning is called",
    "To make a cup of tea, first boil some",
    "When it rains, people usually carry an",
    "The season after winter is",
    "A person who fixes teeth is a",
    "A person who flies an aeroplane is a",
    "You can find books to borrow at the",
    "The shape of a football is a",
    "A leap year has this many days:",
    "The number of minutes in an hour is",
    "The number of hours in a day is",
    "The number of sides of a hexagon is",
    "Ice is the solid form of",
    "Once upon a time, in a small village, there lived a",
    "My favourite thing to do on a rainy afternoon is",
    "The best way to learn a new language is to",
    "Here is a simple recipe for pancakes:",
    "Dear team, I am writing to let you know that",
    "The meeting has been moved to next",
    "Thank you so much for your help with",
    "In conclusion, the most important lesson is",
    "The key to a good night's sleep is",
    "To stay healthy, doctors recommend that adults",
    # coding
    "In Python, you print a line of text with",
    "In Python, the keyword to define a function is",
    "def add(a, b):\n    return",
    "for i in range(3):\n    print(",
    "SELECT name FROM users WHERE",
    "In JavaScript, you declare a constant with the keyword",
    "import numpy as",
    "A list in Python is written with square",
    "git commit -m",
    "The HTML tag for a paragraph is",
    "In Python, a comment starts with the character",
    "int main() {\n    return",
    "# Sort a list of numbers in Python\nnumbers.sort(",
    "The time complexity of binary search is",
    "A function that calls itself is called",
    "To install a Python package, run pip",
    # more everyday knowledge
    "A group of lions is called a",
    "The longest bone in the human body is the",
    "A decade is a period of",
    "A century is a period of",
    "The freezing point of water in degrees Celsius is",
    "The instrument used to look at stars is a",
    "The instrument used to see tiny cells is a",
    "Chess is played on a board with this many squares:",
    "The author of the Harry Potter books is",
    "The inventor of the World Wide Web is",
    "An angle of ninety degrees is called a",
    "The number pi is approximately",
    "A word that describes a noun is called an",
    "The square root of 81 is",
    "The sum of the angles in a triangle is",
]

CHAT = [
    "Can you help me write a polite email declining a meeting invitation?",
    "What's a good name for a golden retriever puppy?",
    "How do I boil an egg so the yolk stays soft?",
    "Hi! How are you doing today?",
    "Tell me a short joke about computers.",
    "What is the difference between a list and a tuple in Python?",
    "Explain recursion to a ten-year-old.",
    "How many cups are in a litre?",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "What should I pack for a weekend camping trip?",
    "Can you suggest three hobbies I could start this winter?",
    "How do I reverse a string in Python?",
    "What does HTTP stand for?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Give me a tip for staying focused while studying.",
    "How do I center a div in CSS?",
    "What's the difference between weather and climate?",
    "Good morning! Any ideas for a quick healthy breakfast?",
    "Thanks for your help earlier, it worked!",
    "What is a prime number?",
    "How do vaccines work, in simple terms?",
    "Can you recommend a classic novel for a long flight?",
    "What is the Pythagorean theorem?",
    "Write a two-line poem about the sea.",
    "How do I make my houseplants grow better?",
    "What is machine learning?",
    "Explain what a black hole is.",
    "How long should I rest between workout sets?",
    "What's the best way to memorise vocabulary?",
    "Please rewrite this sentence more formally: gonna be late, sorry.",
    "What is the capital letter form of the letter q?",
    "How can I politely ask my neighbour to turn down the music?",
    "What is an API?",
    "How do I convert Celsius to Fahrenheit?",
    "Can you explain what inflation means?",
    "What are the primary colours?",
    "Suggest a name for a bakery.",
    "How do I write a for loop in JavaScript?",
    "What is the difference between a virus and a bacterium?",
    "I'm bored. What should I do?",
    "What rhymes with orange?",
    "Can you write a birthday message for my grandmother?",
    "How do I calculate the area of a circle?",
    "What is the meaning of the word serendipity?",
    "How do I fix a merge conflict in git?",
    "What is the boiling point of water in Fahrenheit?",
    "Why do cats purr?",
    "How many legs does a lobster have?",
    "Explain the difference between RAM and storage.",
    "What's a good stretch for a stiff neck?",
    "Write a Python function that returns the square of a number.",
    "What does a linked list look like?",
    "How do I stop procrastinating?",
    "What is the plural of cactus?",
    "Can you explain what a metaphor is, with an example?",
    "What is the largest mammal?",
    "How do solar panels make electricity?",
    "Give me three ideas for a rainy-day activity with kids.",
    "Who painted the ceiling of the Sistine Chapel?",
    "What is a haiku?",
    "How do I make a paper aeroplane?",
    "What is the difference between affect and effect?",
    "How do I say thank you in sign language?",
    "What is an algorithm?",
    "Can you explain the rules of chess briefly?",
    "How do I remove a coffee stain from a shirt?",
    "What does a regular expression do?",
    "Please list the planets in order from the sun.",
    "How many players are on a football team?",
    "What's the difference between a crocodile and an alligator?",
    "Tell me something interesting about octopuses.",
    "How can I improve my handwriting?",
    "What is compound interest?",
    "How do I write a good cover letter?",
    "Is a tomato a fruit or a vegetable?",
    "What does the term photosynthesis mean?",
    "Can you help me plan a short morning routine?",
    "See you later, have a nice day!",
    "What are some good habits for saving money?",
]

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def arithmetic() -> list[tuple[str, str]]:
    out = [("completion", "2 + 2 ="), ("completion", "10 - 3 ="), ("completion", "7 x 6 ="),
           ("completion", "100 / 4 =")]
    for i in range(12):
        a, b = 3 + 7 * i, 11 + 5 * i
        out.append(("completion", f"{a} + {b} ="))
    for i in range(10):
        a, b = 40 + 9 * i, 2 + 3 * i
        out.append(("completion", f"{a} - {b} ="))
    for i in range(10):
        a, b = 2 + i, 3 + (i * 7) % 9
        out.append(("completion", f"{a} times {b} is"))
    for i in range(8):
        a, b = WORDS[i], WORDS[(i * 3 + 1) % 10]
        out.append(("completion", f"{a.capitalize()} plus {b} equals"))
    for i in range(8):
        a, b = 12 + 6 * i, 6 + i
        out.append(("chat", f"What is {a} divided by {b}?"))
    for i in range(6):
        n = 4 + 3 * i
        out.append(("chat", f"What is the square of {n}?"))
    return out


def main() -> None:
    rows = [("completion", t) for t in COMPLETION] + [("chat", t) for t in CHAT] + arithmetic()
    texts = [t for _, t in rows]
    assert len(texts) == len(set(texts)), "duplicate prompt"
    out = Path(__file__).resolve().parent.parent / "training" / "prompts" / "general_prompts.jsonl"
    with open(out, "w") as f:
        for i, (kind, text) in enumerate(rows):
            split = "valid" if i % 4 == 3 else "eval"  # every fourth prompt: valid (disjoint texts)
            f.write(json.dumps({"id": f"general:{i:03d}", "kind": kind, "text": text, "split": split}) + "\n")
    print(out, len(rows))


if __name__ == "__main__":
    main()
