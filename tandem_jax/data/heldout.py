"""Held-out prompts: openings written for this project, on subjects far from the training corpus (the State of the
Union addresses), so that no training step of a drafter saw them. The quickstart and the real-model benchmark decode
these; ``HELDOUT_TUNING`` (disjoint) is for choosing settings such as the router's threshold.
"""

PROMPTS = (
    "The water cycle describes how water moves between the oceans, the atmosphere and the land. It begins when",
    "Photosynthesis is the process by which green plants turn sunlight into chemical energy. Inside each leaf,",
    "To bake a simple loaf of bread at home, you need only four ingredients: flour, water, salt and yeast. First,",
    "The Great Barrier Reef, off the coast of Queensland, is the largest coral reef system in the world. It",
    "A binary search finds an item in a sorted list by repeatedly halving the part of the list that could",
    "Honeybees live in colonies that can hold tens of thousands of workers, a few hundred drones and a single",
    "The first practical telephone was patented in 1876. Within a few decades, cities across Europe and",
    "Volcanoes form where molten rock from deep inside the Earth rises to the surface. Some of them erupt",
    "In chess, the opening phase of the game is about developing the pieces, controlling the centre and",
    "The human heart has four chambers. Blood that returns from the body enters the right atrium, then",
    "Mount Everest, on the border between Nepal and China, is the highest mountain above sea level. Climbers",
    "A good night's sleep matters for health. Adults who regularly sleep less than seven hours are more likely",
    "The Roman aqueducts carried fresh water over long distances into the cities of the empire. Engineers",
    "Electric cars store their energy in large batteries made of many lithium-ion cells. When the driver",
    "The octopus is one of the most intelligent animals in the sea. It can open jars, solve simple puzzles and",
    "Learning a second language as an adult takes patience. The most effective methods combine daily practice",
    "The printing press, developed by Johannes Gutenberg around 1440, changed how knowledge spread in Europe.",
    "A rainbow appears when sunlight is refracted, reflected and dispersed inside water droplets, so that",
    "Coffee was first cultivated on the Arabian Peninsula. From there it spread to Turkey, Persia and, by the",
    "The Amazon rainforest covers much of the Amazon basin in South America and is home to millions of",
    "When you write a function in Python, it is good practice to give it a clear name and a short docstring",
    "Antibiotics are medicines that kill bacteria or stop them from growing. They do not work against viruses,",
    "The Moon has no atmosphere to speak of, so its surface is exposed to extreme temperatures. During the",
    "A budget is a plan for how to spend and save money. To make one, start by listing your monthly income and",
)

HELDOUT_TUNING = (
    "Penguins are flightless birds that live almost entirely in the Southern Hemisphere. Their wings have",
    "The Internet began as a research network that connected a handful of universities. Over time it",
    "Glaciers are slow rivers of ice that form where more snow falls each winter than melts in summer. As",
    "A healthy breakfast gives the body energy for the morning. Good choices include whole grains, fruit and",
    "The Pyramids of Giza were built more than four thousand years ago as tombs for the pharaohs. Workers",
    "Recycling turns used materials such as paper, glass and aluminium into new products, which saves energy",
)
