"""Assistant-style chat requests for the default model's training mix (see build_chat_mix.py)."""

# Assistant-style request forms (how-to, emails, recipes, comparisons, lists,
# advice): the kinds of requests a local chat app gets. Topics avoid the
# held-out ones in benchmarks/chat_prompts.jsonl.
HOW_TO = [
    "clean a cast-iron pan", "tie a tie", "start a vegetable garden", "learn to juggle",
    "write a good cover letter", "prepare for a marathon", "set up a home Wi-Fi network",
    "make cold brew coffee", "train a puppy to sit", "improve my handwriting",
    "save money on groceries", "fall asleep faster", "unclog a bathroom sink",
    "back up my phone", "write a resume with no experience", "plan a surprise party",
    "learn a new language as an adult", "paint a room", "start journaling",
    "negotiate a higher salary", "care for a succulent", "make friends in a new city",
    "organize my closet", "study for a math exam", "keep a conversation going",
    "sharpen a kitchen knife", "reduce screen time", "start a podcast",
    "make homemade pizza dough", "iron a shirt", "meditate for the first time",
    "choose a laptop for college", "fix a squeaky door", "write a speech for a wedding toast",
    "set goals for the new year", "make a paper airplane", "take better photos with my phone",
    "wash a wool sweater", "brew green tea properly", "teach a child to ride a scooter",
]
EXPLAIN = [
    "inflation", "how vaccines train the immune system", "what a blockchain is",
    "how airplanes stay in the air", "what DNA does", "how a credit score works",
    "why the sky is blue", "how tides work", "what an API is", "how batteries store energy",
    "what a recession is", "how the heart pumps blood", "what machine learning is",
    "how a bill becomes a law", "what gravity is", "how noise-cancelling headphones work",
    "what a black hole is", "how recycling works", "what cloud computing is",
    "how a microwave heats food", "what the greenhouse effect is", "how a search engine works",
    "what an index fund is", "how muscles grow", "what a password manager does",
    "how bees make honey", "why we dream", "how a thermostat works", "what an ecosystem is",
    "how GPS finds your location",
]
DIFFERENCE = [
    ("weather", "climate"), ("a latte", "a cappuccino"), ("a comet", "an asteroid"),
    ("a frog", "a toad"), ("a debit card", "a credit card"), ("affect", "effect"),
    ("a hurricane", "a tornado"), ("a CPU", "a GPU"), ("a lake", "a pond"),
    ("baking soda", "baking powder"), ("a dolphin", "a porpoise"), ("RAM", "storage"),
    ("a simile", "a metaphor"), ("a stock", "a bond"), ("a rabbit", "a hare"),
    ("a violin", "a viola"), ("weight", "mass"), ("an emu", "an ostrich"),
    ("a sweet potato", "a yam"), ("HTTP", "HTTPS"),
]
EMAILS = [
    "my manager asking for a day off next Friday", "a teacher about my son's homework",
    "a client apologizing for a late delivery", "my team announcing a new meeting time",
    "a hotel asking about late check-in", "a friend inviting them to dinner",
    "a colleague thanking them for their help on a project", "customer support about a broken headphone",
    "a professor asking for an extension", "my gym cancelling my membership",
    "a recruiter following up after an interview", "my neighbour about a noisy party",
    "a supplier asking for a price quote", "a new employee welcoming them to the team",
    "my doctor's office to reschedule an appointment", "a bookshop asking if a book is in stock",
]
RECIPES = [
    "banana bread", "a simple tomato soup", "pancakes for four", "a chicken stir-fry",
    "guacamole", "overnight oats", "a lentil curry", "chocolate chip cookies",
    "a Greek salad", "scrambled eggs", "fried rice", "a fruit smoothie", "hummus",
    "a vegetable omelette", "lemonade", "a bean chili",
]
LISTS = [
    "five tips for staying focused while studying", "three ways to save energy at home",
    "five classic novels everyone should read", "four hobbies that are cheap to start",
    "five ways to stay healthy during winter", "three board games for a family night",
    "five questions to ask when buying a used car", "four ways to reduce plastic waste",
    "five good habits for a morning routine", "three fun facts about octopuses",
    "five things to do on a rainy day", "four tips for a first-time public speaker",
    "five common mistakes new drivers make", "three easy exercises to do at a desk",
    "five snacks that are high in protein", "four ways to be a better listener",
    "five signs that a website might be a scam", "three tips for writing clear emails",
    "five places to visit in Italy", "four ways to keep a small kitchen tidy",
]
WRITE = [
    "a short poem about autumn leaves", "a haiku about the ocean", "a short story about a lost key",
    "a product description for noise-cancelling headphones", "a motivational quote for Monday morning",
    "a two-sentence horror story", "a short speech for a retirement party",
    "an apology message to a friend for missing their party", "a congratulations note for a new baby",
    "a short bio for a freelance graphic designer", "a tweet announcing a bakery's new opening hours",
    "a short poem about city lights at night", "a fable about a clever fox",
    "a review of a fictional Italian restaurant", "a welcome message for a book club",
    "a short story about a robot learning to paint", "a riddle with its answer",
    "a get-well-soon card for a coworker", "an invitation to a summer barbecue",
    "a short description of a cozy mountain cabin for rent",
]
ADVICE = [
    "I feel nervous before exams. What can I do?", "My roommate never cleans up. How should I bring it up?",
    "I want to get fit but have only 20 minutes a day. Any suggestions?",
    "How can I make my small bedroom feel bigger?", "What are good gifts for a ten-year-old who likes science?",
    "How should I prepare for my first day at a new job?", "What can I cook with rice, eggs and spinach?",
    "How do I keep my plants alive while I'm on vacation?", "What is a healthy breakfast I can make in five minutes?",
    "How can I be more productive in the morning?", "How do I deal with a difficult coworker?",
    "What should I consider when adopting a dog?", "How can I learn to code for free?",
    "What are good ways to relax after a stressful day?", "How do I start investing with a small amount of money?",
    "How can I improve my public speaking?", "What should I do if my laptop is running slowly?",
    "How can I drink more water during the day?", "What are tips for a long flight?",
    "How do I write a good thank-you speech?",
]
QUESTIONS = [
    "Why do cats purr?", "How many planets are in the solar system? Name them.",
    "What is the tallest mountain in the world?", "Who invented the telephone?",
    "Why do leaves change color in autumn?", "How long does it take light from the Sun to reach Earth?",
    "What is the boiling point of water in Fahrenheit and Celsius?", "Why is the ocean salty?",
    "What does a project manager do?", "How do vaccines get approved?",
    "What is the largest animal on Earth?", "Why do we have leap years?",
    "What is the capital of Australia?", "How do birds know where to migrate?",
    "What is a healthy amount of sleep for adults?", "Why do onions make you cry?",
    "What are the primary colors?", "What is the speed of sound?",
    "How does a rainbow form?", "Why do we yawn?",
]
TRANSLATE = [
    "Good morning, how are you?", "I would like a cup of coffee, please.", "Thank you very much.",
    "What time is it?", "Where is the nearest pharmacy?", "I am learning a new language.",
]
LANGS = ["Spanish", "French", "German", "Italian"]


def assistant_prompts():
    out = []
    for task in HOW_TO:
        out += [f"How do I {task}?", f"Give me step-by-step instructions to {task}."]
    for topic in EXPLAIN:
        out += [f"Explain {topic} in simple terms.", f"Can you briefly explain {topic}?"]
    for a, b in DIFFERENCE:
        out += [f"What is the difference between {a} and {b}?"]
    for who in EMAILS:
        out += [f"Write a short email to {who}.", f"Draft a polite message to {who}."]
    for dish in RECIPES:
        out += [f"Give me a recipe for {dish}.", f"How do I make {dish}? Keep it simple."]
    for item in LISTS:
        out += [f"List {item}.", f"Give me {item}."]
    for item in WRITE:
        out += [f"Write {item}."]
    out += ADVICE + QUESTIONS
    for phrase in TRANSLATE:
        for lang in LANGS:
            out.append(f"Translate '{phrase}' into {lang}.")
    return out
