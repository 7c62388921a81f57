"""Built-in code seeds (``seeds.code_seeds = ["builtin:functions.py"]``): small, self-contained functions."""


def gcd(a, b):
    while b:
        a, b = b, a % b
    return abs(a)


def is_prime(n):
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def reverse_words(sentence):
    return " ".join(reversed(sentence.split()))


def count_vowels(text):
    return sum(1 for c in text.lower() if c in "aeiou")


def celsius_to_fahrenheit(c):
    return c * 9 / 5 + 32


def running_total(numbers):
    total, out = 0, []
    for x in numbers:
        total += x
        out.append(total)
    return out


def is_palindrome(text):
    letters = [c.lower() for c in text if c.isalnum()]
    return letters == letters[::-1]
